"""The pretraining data path: Ray Data source over site stores (`source`), CPU multi-crop views
(`crops`) and batched device-side augmentation (`augment`)."""

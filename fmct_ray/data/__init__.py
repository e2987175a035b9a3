"""The data path: Ray Data source over site stores (`source`), CPU multi-crop views (`crops`),
batched device-side augmentation (`augment`), the deterministic evaluation views (`views`) and
frozen-backbone embeddings (`embed`)."""

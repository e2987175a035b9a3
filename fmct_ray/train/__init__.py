"""Ray Train pretraining: the per-worker loop (`pretrain`), checkpoints, metrics and the trainer
builder (`trainer.pretrain` is what `jobs/pretrain_dino.py` and `jobs/pretrain_mae.py` call)."""

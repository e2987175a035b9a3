"""Downstream runs: the fine-tuning and probing recipe (`config`), the training loop of one run
(`finetune`), the Ray Tune fan-out of the matrix and the scratch baseline (`tune`) and the command
line shared by jobs/finetune.py and jobs/sweep_scratch.py (`sweep_cli`)."""

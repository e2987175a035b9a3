"""Build and run the Ray Train `TorchTrainer` of a pretraining run (driver side).

The driver reads the site manifests (ids only), plans the run in samples (epochs x samples per
epoch, or `max_steps` x the global batch of `max_workers` (elastic) or `num_workers`) and resolves
epoch-valued settings into samples; each worker then streams its own shard of the run from the
data position of the checkpoint it resumes from (`fmct_ray.data.sampling.Shard`) and runs the steps
that the group's world size needs to reach the planned samples.
Re-submitting with the same run name and storage path resumes the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fmct_ray.data.source import make_plan
from fmct_ray.storage import StorageConfig
from fmct_ray.train.checkpoint import storage_filesystem
from fmct_ray.train.pretrain import PretrainConfig, resolve, run_length, train_loop_per_worker


@dataclass(frozen=True)
class LaunchConfig:
    """How to run (from the command line, not the recipe).

    Args:
        name: run name; the same name and storage path resume the run.
        storage_path: local folder or s3://bucket/prefix for checkpoints.
        num_workers: training workers (the minimum when `max_workers` is set).
        max_workers: elastic upper bound (None: fixed `num_workers`).
        use_gpu: one GPU per worker.
        cpus_per_worker: CPUs reserved per training worker.
        max_failures: worker-group restarts after failures (-1: unlimited).
        storage: credentials reference of the checkpoint storage.
    """

    name: str
    storage_path: str
    num_workers: int = 1
    max_workers: int | None = None
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    storage: StorageConfig = field(default_factory=StorageConfig)


def build_trainer(cfg: PretrainConfig, launch: LaunchConfig):
    import ray.train
    from ray.train.torch import TorchTrainer

    plan = make_plan(cfg.data)
    world = launch.max_workers or launch.num_workers
    length = run_length(cfg, plan.samples_per_epoch, world)
    resolved = resolve(cfg, length)
    path, fs = storage_filesystem(launch.storage_path, launch.storage)
    workers = (launch.num_workers, launch.max_workers) if launch.max_workers else launch.num_workers
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": resolved, "length": length, "plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=launch.use_gpu, resources_per_worker={"CPU": launch.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=launch.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=launch.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )


def pretrain(cfg: PretrainConfig, launch: LaunchConfig):
    """Run (or resume) a pretraining run; returns Ray Train's `Result`."""
    return build_trainer(cfg, launch).fit()

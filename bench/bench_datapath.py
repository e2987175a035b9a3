"""Benchmark 1 (issue 4): FM-CT DINO samples/s per CPU core delivered to the training loop.

Three paths, run one after the other in one process on the same cores, each using every core the
machine has (`--cores`, default all), timed by wall clock after a warm-up:

  baseline  FM-CT-style: a torch DataLoader with one worker process per core over cached 3x96^3
            fp16 volumes, MONAI transforms per sample (`bench/baseline_fmct.py`: pad to 224^3,
            2 global + 3 local crops, resize, flips, shift, smoothing, gamma).
  local     ours: a Ray Train worker iterating its shard of the run as the training loop does
            (`fmct_ray.data.source.iter_shard`) over a local Zarr store (read, decode, cut the
            FM-CT recipe's 2 global + 3 local int16 views on Ray Data reader actors).
  s3        the same from the loopback S3 server (moto_server, whose CPU use counts too).

Samples/s per core = samples delivered per second / cores. Our CPU side stops at int16 views:
the intensity augmentation runs batched on the training device (`fmct_ray.data.augment`), so it is
not on these cores; the baseline's per-sample augmentation is, as in FM-CT's DataLoader.

    python bench/bench_datapath.py [--seconds 30] [--volumes 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline_fmct import FMCTBaselineDINO, build_cache  # noqa: E402

from fmct_ray import config as config_lib  # noqa: E402
from fmct_ray.data.sampling import Shard  # noqa: E402
from fmct_ray.data.source import DataConfig, iter_shard, make_plan  # noqa: E402
from fmct_ray.sites import SiteSpec  # noqa: E402
from fmct_ray.storage import StorageConfig  # noqa: E402
from fmct_ray.synthetic import synthetic_head, to_int16, write_store  # noqa: E402
from fmct_ray.train.pretrain import PretrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "pretrain" / "fmct_dino_vitb.yaml"
TARGET_PER_CORE, TARGET_RATIO = 12.5, 10.0  # issue 4: 12.5 /core; issue 11: 10x the baseline


# -- baseline -----------------------------------------------------------------------------------
class CachedScans(torch.utils.data.Dataset):
    """FM-CT's PersistentDataset stand-in: cached 3x96^3 fp16 volumes, views made per sample."""

    def __init__(self, caches: list[np.ndarray], length: int) -> None:
        self.caches, self.length, self.views = caches, length, None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.views is None:  # one transform chain per worker process, seeded by its id
            info = torch.utils.data.get_worker_info()
            self.views = FMCTBaselineDINO(seed=info.id if info else 0)
        return self.views(self.caches[i % len(self.caches)])


def bench_baseline(volumes: list[np.ndarray], cores: int, seconds: float, batch: int) -> dict:
    caches = [build_cache(v) for v in volumes[:4]]
    loader = torch.utils.data.DataLoader(
        CachedScans(caches, 10**6),
        batch_size=batch,
        num_workers=cores,
        prefetch_factor=2,
        worker_init_fn=lambda _: torch.set_num_threads(1),
    )
    return time_batches(iter(loader), seconds, warmup=2 * cores)


def time_batches(it, seconds: float, warmup: int) -> dict:
    """Samples/s of an iterator of {"global": (B, ...)} batches over `seconds` after `warmup` batches."""
    for _ in range(warmup):
        next(it)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        n += len(next(it)["global"])
    elapsed = time.perf_counter() - t0
    return {"samples": n, "seconds": elapsed, "samples_per_s": n / elapsed}


# -- ours: the Ray Data source as a Ray Train worker sees it -------------------------------------
def consume(config: dict) -> None:
    """Ray Train worker: iterate the shard like the training loop does, report the rate."""
    import ray.train

    data = config["data"]
    it = iter(iter_shard(data, make_plan(data), config["total"], Shard(), config["batch"]))
    rate = time_batches(it, config["seconds"], config["warmup"])
    with tempfile.TemporaryDirectory() as d:  # Ray Train V2 keeps metrics only with a checkpoint
        ray.train.report(rate, checkpoint=ray.train.Checkpoint.from_directory(d))


def bench_ray(data: DataConfig, seconds: float, batch: int, cores: int) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    total = 10**5  # far more than the window consumes; the stream is lazy
    trainer = TorchTrainer(
        consume,
        train_loop_config={
            "data": data,
            "total": total,
            "batch": batch,
            "seconds": seconds,
            "warmup": 2 * cores,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.01}),
        run_config=ray.train.RunConfig(
            name=f"bench-{time.time_ns()}", storage_path=tempfile.mkdtemp(prefix="bench_runs_")
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return dict(result.metrics)


def data_config(sites: tuple[SiteSpec, ...], cores: int, preserve_order: bool = False) -> DataConfig:
    """The FM-CT DINO recipe's data section (crops, prefetch) on `cores` reader actors."""
    recipe = config_lib.load(PretrainConfig, RECIPE).data
    return DataConfig(
        sites=sites,
        crops=recipe.crops,
        readers=cores,
        cpus_per_reader=0.9,
        volumes_per_task=recipe.volumes_per_task,
        prefetch_batches=recipe.prefetch_batches,
        preserve_order=preserve_order,
        seed=0,
    )


def machine() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line),
        platform.processor(),
    )
    return f"{os.cpu_count()} vCPU {cpu}, {platform.system()} {platform.machine()}, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="timed window per path")
    p.add_argument("--volumes", type=int, default=16, help="synthetic 224^3 scans in each store")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--paths", nargs="*", default=["baseline", "local", "s3"])
    p.add_argument("--preserve-order", action="store_true", help="data.preserve_order (exact resume)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    import psutil
    import ray

    from fmct_ray.testing import S3Server

    out: dict = {"machine": machine(), "cores": args.cores, "load_before": os.getloadavg()}
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp(prefix="bench_datapath_")
    with S3Server() as s3:
        os.environ.update(s3.env())
        if "baseline" in args.paths:
            out["baseline"] = bench_baseline(
                [to_int16(synthetic_head(rng)) for _ in range(4)], args.cores, args.seconds, args.batch
            )
            print("baseline", out["baseline"], flush=True)
        local, remote = str(Path(tmp) / "site"), "s3://bench/site"
        write_store(local, args.volumes, site="L")
        s3.filesystem().mkdir("bench")
        write_store(remote, args.volumes, site="S", storage=StorageConfig(endpoint_url=s3.endpoint))
        ray.init(
            num_cpus=args.cores,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": s3.env()},
        )
        try:
            for name, uri in (("local", local), ("s3", remote)):
                if name in args.paths:
                    cfg = data_config((SiteSpec(name, uri),), args.cores, args.preserve_order)
                    server, t0 = psutil.Process(s3.proc.pid), time.perf_counter()
                    cpu0 = sum(server.cpu_times()[:2])
                    out[name] = bench_ray(cfg, args.seconds, args.batch, args.cores)
                    # cores the S3 server kept busy on average over the whole run (start-up included)
                    out[name]["s3_server_cores"] = (sum(server.cpu_times()[:2]) - cpu0) / (
                        time.perf_counter() - t0
                    )
                    print(name, out[name], flush=True)
        finally:
            ray.shutdown()
    out["load_after"] = os.getloadavg()
    report(out, args.cores)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def report(out: dict, cores: int) -> None:
    print(
        f"\nmachine: {out['machine']}; {cores} cores used; load average before {out['load_before']}, "
        f"after {out['load_after']}"
    )
    base = out.get("baseline", {}).get("samples_per_s")
    for name in ("baseline", "local", "s3"):
        if name not in out:
            continue
        rate = out[name]["samples_per_s"]
        line = f"{name:9s} {rate:7.2f} samples/s  {rate / cores:6.2f} samples/s/core"
        if base and name != "baseline":
            ok = rate / cores >= TARGET_PER_CORE and rate / base >= TARGET_RATIO
            line += f"  {rate / base:5.1f}x baseline  {'meets' if ok else 'misses'} the targets"
        print(line)
        busy = out[name].get("s3_server_cores")
        if busy and busy > 0.01:
            print(
                f"{'':9s} the S3 server kept {busy:.2f} of the {cores} cores busy on average: "
                f"{rate / (cores - busy):.2f} samples/s per core left to the data path"
            )


if __name__ == "__main__":
    main()

"""The SPEC target without volumes: 361,663 scans over 5 sites, 64 training workers x 4 readers,
300 epochs. Measures on this machine, in one process:

  1. manifest consolidation: 361,663 committed rows (one JSON object each, as ingest commits them)
     into one store's manifest.parquet (`SiteStore.consolidate`), time and peak memory;
  2. the driver's plan (`make_plan`: every site's ids of the train split), time and peak memory;
  3. one training worker's shard set-up: the plan as it reaches the worker (pickled), the epoch
     order of its first epoch, and the run indices of its first step (`Shard.global_index`);
  4. the data position a checkpoint stores after a resume without `preserve_order`, as the list of
     skipped samples (before) and as runs (`skip_runs`, now), for two models of how reads finish.

Peak memory is the peak of Python allocations (tracemalloc) during the step, plus the process's
peak resident set at the end.

    .venv/bin/python bench/scale_sim.py [--scans 361663] [--workers 64] [--out /tmp/scale_sim]
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import shutil
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fmct_ray.data.sampling import Shard, fold_consumed, skip_runs
from fmct_ray.data.source import DataConfig, make_plan
from fmct_ray.ingest.store import SiteStore
from fmct_ray.sites import SiteSpec

SHARES = (0.35, 0.25, 0.2, 0.12, 0.08)  # five sites of unequal size


def measured(fn):
    """(result, seconds, peak MB of Python allocations) of fn()."""
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, seconds, peak


def write_sites(root: Path, scans: int) -> tuple[SiteSpec, ...]:
    """Five stores whose committed rows look like ingest's (ids are 32-hex pseudonyms)."""
    sizes = [int(scans * s) for s in SHARES]
    sizes[0] += scans - sum(sizes)
    rng = np.random.default_rng(0)
    sites = []
    for k, n in enumerate(sizes):
        name = f"site{k}"
        store = SiteStore(str(root / name))
        store.init(name)
        ids = [f"{int(a):016x}{int(b):016x}" for a, b in rng.integers(0, 2**63, (n, 2))]
        split = rng.choice(["train", "val", "test"], n, p=[0.8, 0.1, 0.1])
        rows = (
            {
                "scan_id": i,
                "patient_id": f"p{i[:16]}",
                "site": name,
                "split": str(s),
                "stored_shape": [224, 224, 224],
                "checksum": i * 2,
            }
            for i, s in zip(ids, split, strict=True)
        )
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(store.commit, rows, chunksize=256))
        sites.append(SiteSpec(name, str(root / name)))
    return tuple(sites)


def data_position(world: int, per_rank: int, readers: int, done_rows: int, run_rows: int, rng) -> dict:
    """Sizes of the stored position when each rank's shard is cut into runs of `run_rows`
    consecutive rows handed to its `readers` readers in turn, and the readers have finished
    different amounts (`done_rows` per rank in all)."""
    consumed = []
    for rank in range(world):
        rows = []
        for k, d in enumerate(rng.multinomial(done_rows, np.ones(readers) / readers)):
            i = np.arange(d)  # reader k's i-th row: in its (i // run_rows)-th run
            rows.append((k + i // run_rows * readers) * run_rows + i % run_rows)
        consumed.append(Shard(0, rank, world, per_rank).global_index(np.concatenate(rows)))
    start, skip = fold_consumed(0, (), np.concatenate(consumed))
    return {
        "start": start,
        "skipped": len(skip),
        "list_bytes": len(json.dumps(list(skip))),
        "runs": len(skip_runs(skip)),
        "runs_bytes": len(json.dumps(skip_runs(skip))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scans", type=int, default=361_663)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--readers", type=int, default=4)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch", type=int, default=16, help="scans per worker per step")
    p.add_argument("--out", default="/tmp/scale_sim")
    args = p.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    sites = write_sites(root, args.scans)
    print(f"committed {args.scans} rows over {len(sites)} sites in {time.perf_counter() - t0:.0f} s")

    stores = [SiteStore(s.uri) for s in sites]
    _, sec, peak = measured(lambda: [s.consolidate() for s in stores])
    print(f"consolidation of {args.scans} committed rows: {sec:.1f} s, peak {peak:.0f} MB")
    biggest = stores[0]
    _, sec1, peak1 = measured(biggest.consolidate)
    print(f"re-consolidation of the largest site (nothing new): {sec1:.2f} s, peak {peak1:.0f} MB")

    cfg = DataConfig(sites=sites, split="train")
    plan, sec, peak = measured(lambda: make_plan(cfg))
    train = sum(plan.sizes)
    print(f"driver plan: {train} train scans, {sec:.2f} s, peak {peak:.0f} MB")

    blob = pickle.dumps(plan)
    world, per_rank = args.workers, args.batch

    def worker_setup():
        mine = pickle.loads(blob)
        order = mine.order(0)  # the first epoch's (site, row) pairs
        shard = Shard(0, 5, world, per_rank)
        return order, mine.locate(shard.global_index(np.arange(per_rank)))

    _, sec, peak = measured(worker_setup)
    print(f"worker shard set-up: plan {len(blob) / 2**20:.1f} MB pickled, {sec:.2f} s, peak {peak:.0f} MB")

    total = args.epochs * train
    step = world * per_rank
    print(f"run: {args.epochs} epochs = {total} samples, {total // step} steps of {step}")
    rng = np.random.default_rng(0)
    done = 500 * per_rank  # a checkpoint after 500 steps
    models = [
        ("blocks of 2 rows in turn", 2),
        ("a quarter of the shard each", total // world // args.readers),
    ]
    for label, run_rows in models:
        pos = data_position(world, per_rank, args.readers, done, run_rows, rng)
        print(
            f"data position after 500 steps, readers given {label}: {pos['skipped']} samples skipped "
            f"past {pos['start']}; as a list {pos['list_bytes'] / 1e3:.1f} kB, as {pos['runs']} runs "
            f"{pos['runs_bytes'] / 1e3:.1f} kB"
        )
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB")


if __name__ == "__main__":
    main()

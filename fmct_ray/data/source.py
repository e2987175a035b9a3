"""Ray Data source over one or several site stores: ids in, int16 multi-crop views out.

The driver reads the manifests (`make_plan`: scan ids only); which scan is the run's sample `i` is
decided in numpy by `epoch_order(seed, epoch)` (`fmct_ray.data.sampling`, with `Plan`, `Shard` and
the resume position), the order of (site, manifest row) pairs of one epoch
(a fresh permutation every epoch, reproducible from (seed, epoch), with per-site sampling weights).
The dataset itself is a lazy stream of row ids (`index_dataset`; nothing is materialised),
followed by an actor `map_batches` (`VolumeReader`) that maps each row to its sample and scan,
reads the volume once (one GET of the single Zarr chunk) and cuts every view of the recipe from
it. Rows carry int16 crops plus integer ids only (`iter_torch_batches` raises on string columns).

Sample `i` of the run belongs to epoch `i // samples_per_epoch`; its crops use
`np.random.default_rng([seed, i])`, so they do not depend on which worker cut them.

Each training worker streams its own `Shard` of the run (`build_dataset(..., shard=...)`, built in
the worker): optimiser step `k` takes the samples `[k G, (k + 1) G)` of the run (G, the global
batch), rank `r` the `r`-th slice of `L = G / world` of them, in order. So which sample feeds which
rank at which step is a function of (start, world, batch) alone, never of timing, and a run resumed
at sample `s` (`start=s`) sees exactly the samples an uninterrupted run sees from `s` on, at any
world size. (Ray's `streaming_split` hands blocks to whichever rank asks first, which is fast but
makes the assignment, and so a resumed multi-worker run, depend on timing.)

Rows reach the worker in shard order only with `DataConfig.preserve_order`; otherwise in the order
reads finish, and Ray Data hands each reader a long run of consecutive ids, so the samples the
first steps train on are far apart. Every row carries its run index: the training loop records
which samples went into optimiser steps, and `fold_consumed` turns that into the resume position,
every sample below `start` plus the sorted `skip` list above it, which a resumed stream leaves out
(`Shard.skip`). So no sample is trained on twice or skipped in either mode; with `preserve_order`
the resumed run is also identical to an uninterrupted one step for step.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fmct_ray.data.crops import MultiCrop, MultiCropConfig
from fmct_ray.data.sampling import Plan, Shard
from fmct_ray.ingest.store import SiteStore
from fmct_ray.sites import SiteSpec, remote_args, site_scan_ids


@dataclass(frozen=True)
class DataConfig:
    """The streaming data path.

    Args:
        sites: the stores (usually given on the command line, not in the recipe).
        split: manifest split to train on ("train", "val", "test" or "all").
        series: every series of a study, or only its primary one (`fmct_ray.ingest.series`).
        seed: seed of the epoch orders and of the per-sample crop generators.
        crops: multi-crop views cut on the CPU workers.
        samples_per_epoch: epoch length in samples (None: all scans of the split).
        readers: reader actors per training worker (the minimum when `max_readers` is set).
        max_readers: autoscale the reader pool up to this many actors (None: fixed `readers`).
        cpus_per_reader: CPUs reserved per reader actor.
        volumes_per_task: volumes per `map_batches` call (rows per output block).
        prefetch_batches: batches each training worker prefetches.
        preserve_order: deliver each worker's shard in order, so that a resumed run matches an
            uninterrupted one step for step, at any world size. Costs throughput (about half in
            `bench/bench_datapath.py`). Without it a resumed run still trains on every sample
            exactly once (`fold_consumed`), in a different order.
    """

    sites: tuple[SiteSpec, ...] = ()
    split: str = "train"
    series: Literal["all", "primary"] = "all"
    seed: int = 0
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    samples_per_epoch: int | None = None
    readers: int = 2
    max_readers: int | None = None
    cpus_per_reader: float = 1.0
    volumes_per_task: int = 2
    prefetch_batches: int = 2
    preserve_order: bool = False


def make_plan(cfg: DataConfig) -> Plan:
    """The scan ids of `cfg.split` of every site, sorted: each site's manifest is read where that site
    may be read (`fmct_ray.sites.site_scan_ids`), and only its ids reach the caller."""
    if not cfg.sites:
        raise ValueError("no sites: give stores with --stores or a sites file")
    ids = [site_scan_ids(site, cfg.split, cfg.series) for site in cfg.sites]  # read on the site's nodes
    total = sum(len(i) for i in ids)
    if total == 0:
        raise ValueError(f"no scans in split {cfg.split!r} of any site: {[s.uri for s in cfg.sites]}")
    return Plan(tuple(cfg.sites), tuple(ids), cfg.samples_per_epoch or total, cfg.seed)


# -- reading and cutting (inside Ray workers) ------------------------------------------------
class VolumeReader:
    """`map_batches` actor: {"id": shard row} -> {"global", ["local"], "site", "index"}.

    Args:
        plan: the run's scan ids and epoch length.
        crops: the views to cut.
        shard: maps the dataset's rows to run samples.
    """

    def __init__(
        self, plan: Plan, crops: MultiCropConfig, shard: Shard = Shard(), io_threads: int = 4
    ) -> None:
        self.plan, self.shard = plan, shard
        self.cut = MultiCrop(crops)
        self.stores: dict[int, SiteStore] = {}  # opened on first use: a reader resolves only the
        # credentials of the sites it actually reads (site-pinned readers never see the others')
        self.io = ThreadPoolExecutor(io_threads, thread_name_prefix="fmct-read")

    def read(self, site: int, scan_id: str) -> np.ndarray:
        if site not in self.stores:
            spec = self.plan.sites[site]
            self.stores[site] = SiteStore(spec.uri, spec.storage)
        return self.stores[site].read_volume(scan_id)  # metadata + single chunk, one round trip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = self.shard.global_index(batch["id"])
        where = self.plan.locate(index)
        # Every volume of the batch is fetched and decoded at once on I/O threads, so the round
        # trips of the later ones overlap the cutting of the first (object storage latency is tens
        # of ms per GET; the cutting runs here, in order).
        volumes = self.io.map(lambda sr: self.read(int(sr[0]), self.plan.scan_ids[sr[0]][sr[1]]), where)
        views = [
            self.cut(volume, np.random.default_rng([self.plan.seed, i]))
            for volume, i in zip(volumes, index, strict=True)
        ]
        out = {"global": np.stack([v["global"] for v in views]), "site": where[:, 0], "index": index}
        if self.cut.cfg.n_local:
            out["local"] = np.stack([v["local"] for v in views])
        return out


def index_dataset(n: int, rows_per_block: int, read_tasks: int = 64, num_cpus: float = 0.0):
    """Lazy dataset of {"id": 0 .. n - 1}, `rows_per_block` per block.

    Like `ray.data.range`, but its read tasks reserve no CPU (ids are free to make; a CPU per read
    task starves small clusters whose CPUs are held by training workers and readers) and each task
    streams many small blocks, so a long run needs few tasks.
    """
    import pyarrow as pa
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def blocks(lo: int, hi: int):
        for a in range(lo, hi, rows_per_block):
            yield pa.table({"id": np.arange(a, min(a + rows_per_block, hi), dtype=np.int64)})

    class _Ids(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return 8 * n

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            per = rows_per_block * max(1, -(-n // (rows_per_block * max(1, read_tasks))))
            return [
                ReadTask(
                    functools.partial(blocks, lo, min(lo + per, n)),
                    BlockMetadata(min(per, n - lo), 8 * min(per, n - lo), None, None),
                )
                for lo in range(0, n, per)
            ]

    return ray.data.read_datasource(_Ids(), num_cpus=num_cpus)


def _select_sites(batch: dict[str, np.ndarray], plan: Plan, sites: tuple[int, ...], shard: Shard) -> dict:
    """Keep the rows whose sample belongs to one of `sites` (cheap: ids only)."""
    keep = np.isin(plan.locate(shard.global_index(batch["id"]))[:, 0], sites)
    return {"id": batch["id"][keep]}


def build_dataset(cfg: DataConfig, total_samples: int, shard: Shard = Shard(), plan: Plan | None = None):
    """The lazy Ray Dataset of one worker's shard of samples [shard.start, total_samples) of a run.

    Rows come in shard order with `cfg.preserve_order`. Readers of sites that name a `resource` run
    only where that resource exists (`fmct_ray.sites.remote_args`; one pipeline per resource,
    unioned; order then holds per site only); otherwise one pipeline serves every site. The
    execution options are the dataset's own (its `context`), never the process's current
    `DataContext`, so the stream is the same whoever built a dataset before.
    """
    plan = plan or make_plan(cfg)
    groups: dict[str | None, list[int]] = {}
    for i, site in enumerate(plan.sites):
        groups.setdefault(site.resource, []).append(i)
    rows_per_block = max(cfg.volumes_per_task, 1)  # one reader call per block
    pipelines = []
    for members in groups.values():
        ds = index_dataset(shard.rows(total_samples), rows_per_block)
        ctx = ds.context  # shared by the datasets derived from ds, and by no other
        ctx.execution_options.preserve_order = cfg.preserve_order  # exact resume (see DataConfig)
        ctx.enable_progress_bars = False  # one bar per training worker floods the job log
        # Ray Data fails the stream at the first reader actor that dies while starting (budget 0):
        # on a busy cluster it cancels some itself ("never ran"); replace a few instead.
        ctx.max_consecutive_actor_init_deaths = max(ctx.max_consecutive_actor_init_deaths, 3)
        if len(groups) > 1:
            ds = ds.map_batches(
                _select_sites,
                fn_kwargs={"plan": plan, "sites": tuple(members), "shard": shard},
                batch_format="numpy",
                num_cpus=0,
            )
        pipelines.append(
            ds.map_batches(
                VolumeReader,
                fn_constructor_kwargs={
                    "plan": plan,
                    "crops": cfg.crops,
                    "shard": shard,
                },
                batch_size=cfg.volumes_per_task,
                batch_format="numpy",
                concurrency=(cfg.readers, cfg.max_readers) if cfg.max_readers else cfg.readers,
                num_cpus=cfg.cpus_per_reader,
                **remote_args(plan.sites[members[0]]),
            )
        )
    return pipelines[0] if len(pipelines) == 1 else pipelines[0].union(*pipelines[1:])


def iter_shard(cfg: DataConfig, plan: Plan, total_samples: int, shard: Shard, batch_size: int, device="auto"):
    """A training worker's batches of its shard (whole batches only), built and run in the worker."""
    ds = build_dataset(cfg, total_samples, shard=shard, plan=plan)
    return ds.iter_torch_batches(
        batch_size=batch_size, drop_last=True, prefetch_batches=cfg.prefetch_batches, device=device
    )

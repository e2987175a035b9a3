"""Federated averaging: sites whose scans may not leave their nodes train locally, weights are averaged.

Each round, the driver sends the global task weights (DINO: student, EMA teacher, centres; MAE:
the model) to one Ray task per site, scheduled with `fmct_ray.sites.remote_args(site)` so it runs
only on that site's nodes. The task reads the site's own store, runs `local_steps` optimiser steps
with the normal `train_step` (fresh AdamW each round: optimiser moments are never exchanged), and
returns only the weights and a loss. The driver averages the weights, weighted by each site's
number of training scans (a count, obtained on the site's node), and checkpoints the round.

Nothing else crosses a site boundary: the driver never opens a store, scan ids stay on the site.

Determinism: sample `i` of site `s` is `VolumeReader`'s sample `i` of a one-site plan seeded from
(data.seed, s), the step's random draws are `step_seeds(train.seed, step, rank=s, micro)`, and
step = round x local_steps + local step; so a run stopped after any round and resumed matches
an uninterrupted one exactly. A site's schedules run at samples (step + 1) x its global batch of
the planned rounds x local_steps x that batch.

Checkpoints (`<storage_path>/<name>/`):

    round_000001/task.pt      averaged global task state after round 1
    round_000001/state.json   round, step, seed, site names and sizes, per-round losses
    round_000001/config.yaml  the resolved PretrainConfig (federated.yaml: the FederatedConfig)
    latest.json               {"round": 1, "path": "round_000001"}: written last, atomically

A folder is only used once `latest.json` points at it, so a driver killed mid-write resumes from
the previous round. Re-running with the same name resumes; after the last round it does nothing.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import torch

from fmct_ray import config as config_lib
from fmct_ray.data.sampling import Plan
from fmct_ray.data.source import VolumeReader
from fmct_ray.objectives import Progress, build_optimizer
from fmct_ray.sites import SiteSpec, _scan_ids, remote_args, run_on_site
from fmct_ray.storage import StorageConfig, atomic_write, filesystem, join
from fmct_ray.train.checkpoint import task_state
from fmct_ray.train.pretrain import (
    Loop,
    PretrainConfig,
    RunLength,
    build_augment,
    build_task,
    export_backbone,
    resolve,
    train_step,
)

LATEST = "latest.json"


@dataclass(frozen=True)
class FederatedConfig:
    """How a federated run is split into rounds (the recipe's `train.epochs/max_steps` are unused).

    Args:
        rounds: averaging rounds of the run.
        local_steps: optimiser steps each site runs per round.
        stop_after: end this invocation after this many rounds in total (checkpointed); re-running
            the same name resumes.
        cpus_per_site: CPUs reserved by each site's training task.
        gpus_per_site: GPUs reserved by each site's training task (0: CPU).
        keep_checkpoints: round checkpoints kept in storage (the latest always is).
    """

    rounds: int = 10
    local_steps: int = 100
    stop_after: int | None = None
    cpus_per_site: float = 1.0
    gpus_per_site: float = 0.0
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        for name in ("rounds", "local_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"federated.{name} must be >= 1, got {getattr(self, name)}")


# -- averaging ---------------------------------------------------------------------------------
def average_states(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of floating-point tensors (in float64, cast back); other tensors (integer
    counters) are taken from the first state. Weights need not sum to 1."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys:
            raise ValueError(f"state {i} has different keys: {sorted(keys ^ set(s))[:5]}")
    out = {}
    for k, ref in states[0].items():
        if ref.is_floating_point():
            acc = sum(s[k].double() * (w / total) for s, w in zip(states, weights, strict=True))
            out[k] = acc.to(ref.dtype)
        else:
            out[k] = ref.clone()
    return out


# -- on a site's node --------------------------------------------------------------------------
def site_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _site_size(site: SiteSpec, split: str, series: str) -> int:
    return len(_scan_ids(site, split, series))


def local_round(
    cfg: PretrainConfig,
    length: RunLength,
    fed: FederatedConfig,
    site: SiteSpec,
    index: int,
    round_: int,
    weights: dict[str, torch.Tensor],
) -> dict:
    """Train `fed.local_steps` steps of round `round_` (0-based) on `site`'s own scans, starting
    from the global `weights`; returns {"state": weights, "loss": mean loss}. Runs on the site's node."""
    ids = _scan_ids(site, cfg.data.split, cfg.data.series)
    if not ids:
        raise ValueError(f"site {site.name!r} ({site.uri}): no scans in split {cfg.data.split!r}")
    use_gpu = fed.gpus_per_site > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    task = build_task(cfg)
    task.load_state_dict(weights)
    task.to(device).train()
    model = task.trainable
    loop = Loop(
        cfg, length, task, model, build_optimizer(model, cfg.optim), build_augment(cfg), device, index
    )
    reader = VolumeReader(
        Plan((site,), (ids,), len(ids), site_seed(cfg.data.seed, index)),
        cfg.data.crops,
    )
    b, accum, losses = cfg.train.batch_size, cfg.train.accum_steps, []
    for k in range(fed.local_steps):
        step = round_ * fed.local_steps + k
        micro = []
        for m in range(accum):
            first = (step * accum + m) * b
            out = reader({"id": np.arange(first, first + b, dtype=np.int64)})
            micro.append({v: torch.from_numpy(out[v]).to(device) for v in ("global", "local") if v in out})
        progress = Progress((step + 1) * loop.global_batch, length.total_samples)
        losses.append(train_step(loop, micro, step, progress)["loss"])
    return {"state": task_state(task), "loss": float(np.mean(losses))}


# -- checkpoints -------------------------------------------------------------------------------
def _tensor_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def latest(storage_path: str, name: str, storage: StorageConfig | None = None) -> dict | None:
    """{"round", "path", "state", "weights"} of the run's latest complete round, or None."""
    fs, root = filesystem(join(storage_path.rstrip("/"), name), storage)
    fs.invalidate_cache()
    if not fs.exists(join(root, LATEST)):
        return None
    pointer = json.loads(fs.cat_file(join(root, LATEST)))
    folder = join(root, pointer["path"])
    state = json.loads(fs.cat_file(join(folder, "state.json")))
    weights = torch.load(
        io.BytesIO(fs.cat_file(join(folder, "task.pt"))), map_location="cpu", weights_only=True
    )
    return {**pointer, "state": state, "weights": weights}


def save_round(storage_path: str, name: str, storage, payload: dict, final_task=None) -> str:
    """Write round `payload["state"]["round"]`, then point `latest.json` at it; prune old rounds."""
    fs, root = filesystem(join(storage_path.rstrip("/"), name), storage)
    state, folder_name = payload["state"], f"round_{payload['state']['round']:06d}"
    folder = join(root, folder_name)
    fs.makedirs(folder, exist_ok=True)
    atomic_write(fs, join(folder, "task.pt"), _tensor_bytes(payload["weights"]))
    atomic_write(fs, join(folder, "config.yaml"), config_lib.dump(payload["cfg"]).encode())
    atomic_write(fs, join(folder, "federated.yaml"), config_lib.dump(payload["fed"]).encode())
    atomic_write(fs, join(folder, "state.json"), json.dumps(state, indent=1).encode())
    if final_task is not None:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as d:
            path = export_backbone(final_task, Path(d) / "teacher_backbone.pt")
            atomic_write(fs, join(folder, "teacher_backbone.pt"), path.read_bytes())
    atomic_write(fs, join(root, LATEST), json.dumps({"round": state["round"], "path": folder_name}).encode())
    rounds = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("round_"))
    for old in rounds[: -payload["fed"].keep_checkpoints]:
        fs.rm(old, recursive=True)
    return f"{storage_path.rstrip('/')}/{name}/{folder_name}"


# -- the driver --------------------------------------------------------------------------------
def site_sizes(sites: tuple[SiteSpec, ...], split: str, series: str = "all") -> list[int]:
    """Training scans per site, each counted on the site's own nodes (only the count leaves)."""
    sizes = [int(run_on_site(s, _site_size, s, split, series)) for s in sites]
    empty = [s.name for s, n in zip(sites, sizes, strict=True) if n == 0]
    if empty:
        raise ValueError(f"sites with no scans in split {split!r}: {empty}")
    return sizes


def plan_run(cfg: PretrainConfig, fed: FederatedConfig, sizes: list[int]) -> tuple[PretrainConfig, RunLength]:
    """Each site is one worker; the run is rounds x local_steps steps of a site's global batch;
    epochs count all sites' scans."""
    per_step = cfg.train.batch_size * cfg.train.accum_steps
    length = RunLength(cfg.data.samples_per_epoch or sum(sizes), fed.rounds * fed.local_steps * per_step)
    return resolve(cfg, length), length


def run_federated(
    cfg: PretrainConfig,
    fed: FederatedConfig,
    sites: tuple[SiteSpec, ...],
    storage_path: str,
    name: str,
    storage: StorageConfig | None = None,
) -> dict:
    """Run (or resume) a federated run; returns the state.json of the last round written (or found)."""
    import ray

    if not sites:
        raise ValueError("federated training needs at least one site")
    sizes = site_sizes(tuple(sites), cfg.data.split, cfg.data.series)
    resolved, length = plan_run(cfg, fed, sizes)
    found = latest(storage_path, name, storage)
    if found is None:
        weights, history, start = task_state(build_task(resolved)), [], 0
    else:
        _check_resume(found["state"], fed, sites, sizes, storage_path, name)
        weights, history, start = found["weights"], found["state"]["history"], found["round"]
    stop = fed.rounds if fed.stop_after is None else min(fed.rounds, fed.stop_after)
    state = found["state"] if found else None
    for r in range(start, stop):
        shared = ray.put(weights)  # one copy in the object store, fetched by each site's task
        futures = [
            ray.remote(local_round)
            .options(num_cpus=fed.cpus_per_site, num_gpus=fed.gpus_per_site, max_retries=2, **remote_args(s))
            .remote(resolved, length, fed, s, i, r, shared)
            for i, s in enumerate(sites)
        ]
        results = ray.get(futures)
        weights = average_states([x["state"] for x in results], [float(n) for n in sizes])
        history.append(
            {"round": r + 1, "loss": {s.name: x["loss"] for s, x in zip(sites, results, strict=True)}}
        )
        state = {
            "round": r + 1,
            "step": (r + 1) * fed.local_steps,
            "rounds": fed.rounds,
            "seed": resolved.train.seed,
            "data_seed": resolved.data.seed,
            "sites": [s.name for s in sites],
            "sizes": sizes,
            "history": history,
        }
        final = (
            _final_task(resolved, weights) if r + 1 == fed.rounds and resolved.train.export_backbone else None
        )
        path = save_round(
            storage_path,
            name,
            storage,
            {"state": state, "weights": weights, "cfg": resolved, "fed": fed},
            final,
        )
        print(
            f"federated round {r + 1}/{fed.rounds}: "
            + ", ".join(f"{k} loss {v:.4f}" for k, v in history[-1]["loss"].items())
            + f" -> {path}",
            flush=True,
        )
    return state


def _final_task(cfg: PretrainConfig, weights: dict):
    task = build_task(cfg)
    task.load_state_dict(weights)
    return task


def _check_resume(state: dict, fed: FederatedConfig, sites, sizes, storage_path: str, name: str) -> None:
    """A resumed run must be the same run: same sites (and sizes) and the same round length."""
    where = f"run {name!r} in {storage_path}"
    if state["sites"] != [s.name for s in sites] or state["sizes"] != sizes:
        raise ValueError(
            f"{where} was trained on sites {state['sites']} (sizes {state['sizes']}), "
            f"not {[s.name for s in sites]} (sizes {sizes}); use a new --name"
        )
    if state["step"] != state["round"] * fed.local_steps or state["rounds"] != fed.rounds:
        raise ValueError(f"{where} has a different rounds/local_steps; use a new --name")

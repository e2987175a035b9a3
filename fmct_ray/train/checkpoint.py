"""Pretraining checkpoints: what is saved, how it is restored, and where a resumed run's data starts.

A checkpoint is one folder that every rank reports through `ray.train.report(..., checkpoint=...)`
(Ray merges the ranks' files into one folder in the run's storage):

    task.pt            task state dict (student, EMA teacher, DINO/iBOT centres); rank 0
    optimizer.pt       AdamW state; rank 0
    state.json         step, epoch, planned samples (and steps at this world size), and the data
                       position: samples consumed and `skip_runs`, the consumed samples above
                       the first one not yet consumed as [first, count] runs; rank 0
    config.yaml        the resolved PretrainConfig; rank 0
    metrics.csv        every metrics row of the run so far; rank 0
    rng_rank<r>.pt     torch / numpy / python RNG states of rank r; every rank
    teacher_backbone.pt  exported backbone (final checkpoint only; `fmct_ray.models.load_backbone`)
    manifest_rank<r>.json  size and SHA-256 of each file rank r wrote, written after them; rank 0's
                       also records the world size, so a checkpoint is whole when every rank's
                       manifest is there and every file matches its line (`verify`)

A checkpoint a write left incomplete (a node lost while uploading, a truncated or damaged file) is
never resumed from: resume takes the newest registered checkpoint that verifies (`pretrain.restore`).

Schedules are pure functions of the samples consumed (over the planned total), so `samples` *is*
the schedulers' state, whatever the world size of the group that resumes.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmct_ray import config as config_lib
from fmct_ray.storage import StorageConfig, absolute, filesystem, is_remote, join, storage_options

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2 writes it once a checkpoint is registered


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def task_state(task: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The task's state dict with DDP's `module.` infix removed (keys as in an unwrapped task)."""
    return {
        k.replace(".module.", ".", 1) if ".module." in k else k: v.detach().cpu()
        for k, v in task.state_dict().items()
    }


def save(
    directory: str | Path,
    rank: int,
    *,
    task=None,
    optimizer=None,
    state: dict | None = None,
    cfg=None,
    metrics_csv: str | None = None,
    world: int = 1,
    extra: tuple[str, ...] = (),
) -> Path:
    """Write this rank's part of a checkpoint into `directory` (rank 0 writes the shared parts),
    then its manifest over those files and the `extra` ones (written into `directory` before)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = [f"rng_rank{rank}.pt", *extra]
    torch.save(rng_state(), d / files[0])
    if rank == 0:
        torch.save(task_state(task), d / "task.pt")
        torch.save(optimizer.state_dict(), d / "optimizer.pt")
        (d / "state.json").write_text(json.dumps(state, indent=1))
        config_lib.save(cfg, d / "config.yaml")
        files += ["task.pt", "optimizer.pt", "state.json", "config.yaml"]
        if metrics_csv is not None and Path(metrics_csv).exists():
            (d / "metrics.csv").write_bytes(Path(metrics_csv).read_bytes())
            files.append("metrics.csv")
    manifest = {"files": {f: file_entry(d / f) for f in files}, **({"world": world} if rank == 0 else {})}
    (d / f"manifest_rank{rank}.json").write_text(json.dumps(manifest, indent=1))
    return d


def file_entry(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def verify(directory: str | Path) -> str | None:
    """Why the checkpoint in `directory` is not whole (a manifest or file missing, a size or
    checksum that differs), or None when every rank's manifest is there and every file matches."""
    d = Path(directory)

    def manifest(rank: int) -> dict:
        path = d / f"manifest_rank{rank}.json"
        if not path.exists():
            raise ValueError(f"{path.name} is missing (a write that did not finish)")
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path.name} is not valid JSON ({e})") from None

    try:
        first = manifest(0)
        manifests = [first, *(manifest(r) for r in range(1, int(first.get("world", 1))))]
    except ValueError as e:
        return str(e)
    for m in manifests:
        for name, want in m["files"].items():
            path = d / name
            if not path.exists():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != want["size"]:
                return f"{name} has {size} bytes, its manifest says {want['size']}"
            if file_entry(path)["sha256"] != want["sha256"]:
                return f"{name} does not match its checksum"
    return None


def load(directory: str | Path, rank: int, task, optimizer) -> dict:
    """Restore task, optimiser and this rank's RNG states; returns state.json."""
    d = Path(directory)
    task.load_state_dict(torch.load(d / "task.pt", map_location="cpu", weights_only=True))
    optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True))
    rng_file = d / f"rng_rank{rank}.pt"
    if rng_file.exists():  # a resized (elastic) group has ranks the old one did not
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((d / "state.json").read_text())


def latest_checkpoint(storage_path: str, name: str, storage: StorageConfig | None = None) -> str | None:
    """URI of the run's latest registered checkpoint folder, or None before the first one."""
    from ray.train import Result

    uri = join(storage_path.rstrip("/"), name)
    fs, root = filesystem(uri, storage)
    fs.invalidate_cache()  # s3fs caches listings; the snapshot changes under a long-lived process
    if not fs.exists(join(root, SNAPSHOT)):
        return None
    path, pafs = storage_filesystem(uri, storage)
    checkpoint = Result.from_path(path if pafs else root, storage_filesystem=pafs).checkpoint
    if checkpoint is None:
        return None
    return checkpoint.path if "://" not in uri else f"{uri.split('://', 1)[0]}://{checkpoint.path}"


def storage_filesystem(storage_path: str, storage: StorageConfig | None = None):
    """(path, pyarrow filesystem or None) for RunConfig. s3 goes through s3fs wrapped for pyarrow:
    pyarrow's own S3FileSystem fails CompleteMultipartUpload against moto (RAY_ZARR_NOTES)."""
    if not is_remote(storage_path):
        return absolute(storage_path.removeprefix("file://")), None
    import pyarrow.fs
    import s3fs

    handler = pyarrow.fs.FSSpecHandler(s3fs.S3FileSystem(**storage_options(storage)))
    return storage_path.split("://", 1)[1], pyarrow.fs.PyFileSystem(handler)

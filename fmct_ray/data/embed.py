"""Frozen-backbone embeddings, extracted once with a Ray Data batch job and cached as Parquet.

Probes on a frozen backbone need the backbone's forward pass once per scan, not once per epoch,
trial and seed. `extract_embeddings` lists the scans of the site manifests (a pinned site's on its
own nodes), and an actor pool per site resource (`Embedder`, a callable class for `map_batches`,
one GPU per actor when there are GPUs) reads each volume, cuts the evaluation view, windows it and
runs the backbone; the driver streams the rows into one Parquet file: scan_id, patient_id, site,
split, `cls` (D floats), optionally `patch_mean` (mean of the patch tokens) and `tokens`
((1 + N) x D, CLS first, float16, for attentive probes).

`Embedder` itself has no Ray in it and is tested directly; Ray is imported inside
`extract_embeddings` only, so that `fmct_ray.eval` stays importable without Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fmct_ray.data.views import ViewConfig, ViewLoader, to_model_input
from fmct_ray.models import create_model, load_backbone
from fmct_ray.models.vit3d import VisionTransformer3D
from fmct_ray.sites import SiteSpec
from fmct_ray.storage import StorageConfig, filesystem


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone: an exported file (`save_backbone`) or a random-initialised preset (scratch).

    Args:
        path: backbone file; None builds `preset` with random weights.
        preset: registered model name (used when `path` is None).
        overrides: ViT3DConfig fields replaced in the preset (e.g. img_size for small test views).
        seed: random-init seed (scratch).
    """

    path: str | None = None
    preset: str = "vit3d_base"
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def build_backbone(cfg: BackboneConfig) -> VisionTransformer3D:
    if cfg.path:
        return load_backbone(cfg.path)
    torch.manual_seed(cfg.seed)
    return create_model(cfg.preset, **cfg.overrides)


@dataclass(frozen=True)
class EmbedConfig:
    """The embedding job.

    Args:
        backbone: the frozen backbone.
        view: the evaluation view.
        patch_mean: also store the mean patch token.
        tokens: also store all tokens (float16; needed by attentive probes on the fast path).
        batch_size: scans per actor call.
        actors: actor pool size.
        gpus_per_actor: GPUs per actor (0 on CPU clusters).
        cpus_per_actor: CPUs per actor.
        read_threads: parallel volume reads inside an actor.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    view: ViewConfig = field(default_factory=ViewConfig)
    patch_mean: bool = True
    tokens: bool = False
    batch_size: int = 8
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    read_threads: int = 4


class Embedder:
    """`map_batches` callable: {scan_id, site, ...} -> the same rows plus their embeddings."""

    def __init__(
        self, cfg: EmbedConfig, stores: dict[str, str], storage: dict[str, StorageConfig] | None = None
    ):
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_backbone(cfg.backbone).eval().to(self.device)
        self.loader = ViewLoader(stores, cfg.view, storage, threads=cfg.read_threads, cache=False)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        views = self.loader(batch["site"], batch["scan_id"])
        x = to_model_input(views, self.cfg.view, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            feats = self.model.forward_features(x)
        out = dict(batch)
        out["cls"] = feats["cls"].float().cpu().numpy()
        if self.cfg.patch_mean:
            out["patch_mean"] = feats["patch"].float().mean(1).cpu().numpy()
        if self.cfg.tokens:
            tokens = torch.cat([feats["cls"].unsqueeze(1), feats["patch"]], 1)
            out["tokens"] = tokens.to(torch.float16).cpu().numpy()
        return out


def scan_table(manifests: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """scan_id, patient_id, site, split of every scan of the given site manifests."""
    frames = [
        m.assign(site=site)[["scan_id", "patient_id", "site", "split"]] for site, m in manifests.items()
    ]
    return pd.concat(frames, ignore_index=True)


def _arrow_batch(batch: dict[str, np.ndarray]) -> pa.RecordBatch:
    """Fixed-size list columns for the vectors, so that Parquet readers need no Ray extension types."""
    cols = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 1:
            cols[name] = pa.array(value.tolist() if value.dtype == object else value)
        else:
            flat = pa.array(value.reshape(-1))
            cols[name] = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(value.shape[1:])))
    return pa.RecordBatch.from_pydict(cols)


def _site_scans(site: SiteSpec, splits: tuple[str, ...]) -> pd.DataFrame:
    """scan_id, patient_id, site, split of the site's scans of `splits` (pseudonymous ids only:
    what may leave a pinned site's nodes)."""
    from fmct_ray.ingest.store import SiteStore

    table = scan_table({site.name: SiteStore(site.uri, site.storage).manifest()})
    return table[table["split"].isin(splits)]


def extract_embeddings(
    cfg: EmbedConfig,
    sites: Sequence[SiteSpec],
    out_uri: str,
    out_storage: StorageConfig | None = None,
    splits: tuple[str, ...] = ("train", "val", "test"),
) -> int:
    """Embed every scan of `splits` of the sites' stores into the Parquet file `out_uri`; returns rows.

    A site pinned to its nodes (`SiteSpec.resource`) has its manifest read and its volumes embedded
    only there: its scan list comes from a task on its nodes (`run_on_site`), and its scans go to an
    actor pool of their own (`cfg.actors` actors) that asks for the site's resource. Only the
    embeddings and pseudonymous ids reach the driver.

    Args:
        cfg: backbone, view and actor pool.
        sites: the sites (name, store URI, credentials reference, resource).
        out_uri: Parquet file (local or s3://).
        out_storage: credentials reference of the output.
        splits: manifest splits to embed.
    """
    import ray

    from fmct_ray.sites import remote_args, run_on_site

    tables = {s.name: run_on_site(s, _site_scans, s, splits) for s in sites}
    if sum(len(t) for t in tables.values()) == 0:
        raise ValueError(f"no scans of splits {splits} in stores {[s.uri for s in sites]}")
    pools = {}  # one actor pool per resource: a pinned site's reads stay on its nodes
    for site in sites:
        pools.setdefault(site.resource, []).append(site)
    parts = []
    for group in pools.values():
        table = pd.concat([tables[s.name] for s in group], ignore_index=True)
        if table.empty:
            continue
        blocks = max(1, min(len(table) // cfg.batch_size, 4 * cfg.actors))  # enough to feed every actor
        stores = {s.name: s.uri for s in group}
        storage = {s.name: s.storage for s in group}
        parts.append(
            ray.data.from_items(table.to_dict("records"), override_num_blocks=blocks).map_batches(
                Embedder,
                fn_constructor_kwargs={"cfg": cfg, "stores": stores, "storage": storage},
                batch_size=cfg.batch_size,
                concurrency=cfg.actors,
                num_gpus=cfg.gpus_per_actor,
                num_cpus=cfg.cpus_per_actor,
                batch_format="numpy",
                **remote_args(group[0]),
            )
        )
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    fs, path = filesystem(out_uri, out_storage)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    rows, writer = 0, None
    with fs.open(path + ".tmp", "wb") as f:
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            rb = _arrow_batch(batch)
            writer = writer or pq.ParquetWriter(f, rb.schema)
            writer.write_batch(rb)
            rows += rb.num_rows
        if writer is not None:
            writer.close()
    fs.mv(path + ".tmp", path)  # readers never see a half-written file
    return rows


def load_embeddings(uri: str, storage: StorageConfig | None = None) -> pd.DataFrame:
    """The embedding table; vector columns come back as numpy arrays (one per row)."""
    fs, path = filesystem(uri, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"embeddings {uri} do not exist (run `jobs/finetune.py embed` first)")
    with fs.open(path, "rb") as f:
        frame = pq.read_table(f).to_pandas()
    return frame


def matrix(frame: pd.DataFrame, column: str, dim: int | None = None) -> np.ndarray:
    """Stack a vector column into (N, ...) float32; `dim` reshapes flattened tokens to (N, T, dim)."""
    x = np.stack([np.asarray(v, dtype=np.float32) for v in frame[column]])
    return x.reshape(len(x), -1, dim) if dim else x

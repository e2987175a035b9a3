"""Evaluation inputs: stored 224^3 int16 volume -> centre 192^3 -> 96^3 -> HU windows (SPEC 1).

Shared by the embedding job, fine-tuning and the attention maps, so every downstream path sees the
same deterministic input. `ViewLoader` reads views with a thread pool (reads are I/O: one GET per
volume) and can keep them in memory for small training sets (few-shot pools are read once).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fmct_ray.data.augment import AugmentConfig, GPUAugment
from fmct_ray.data.crops import eval_view
from fmct_ray.ingest.store import SiteStore
from fmct_ray.storage import StorageConfig


@dataclass(frozen=True)
class ViewConfig:
    """The deterministic evaluation view.

    Args:
        crop: centre crop edge of the stored volume (SPEC: 192).
        size: edge after resizing (SPEC: 96; the backbone's input size).
        intensity: FM-CT's three HU windows, or VoxelFM's clipped z-score (1 channel).
    """

    crop: int = 192
    size: int = 96
    intensity: Literal["windows", "zscore"] = "windows"

    def augment(self, flip_prob: float = 0.0) -> GPUAugment:
        """Windowing without random augmentation (flips only when asked, for training)."""
        cfg = AugmentConfig(
            intensity=self.intensity, flip_prob=flip_prob, shift_prob=0.0, smooth_prob=0.0, gamma_prob=0.0
        )
        return GPUAugment(cfg)


def to_model_input(
    views: np.ndarray | torch.Tensor,
    cfg: ViewConfig,
    device: str | torch.device = "cpu",
    flip_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, s, s, s) int16 HU views -> float (B, C, s, s, s) model input on `device`."""
    x = torch.as_tensor(np.asarray(views)).to(device)
    return cfg.augment(flip_prob)(x, generator)


class ViewLoader:
    """Eval views of scans of several sites, read in parallel, optionally cached in memory.

    Args:
        stores: site name -> store URI.
        cfg: the view.
        storage: site name -> credentials reference (missing: defaults).
        threads: parallel reads.
        cache: keep views in memory (small sets, repeated epochs).
    """

    def __init__(
        self,
        stores: dict[str, str],
        cfg: ViewConfig,
        storage: dict[str, StorageConfig] | None = None,
        threads: int = 4,
        cache: bool = True,
    ) -> None:
        storage = storage or {}
        self.stores = {name: SiteStore(uri, storage.get(name)) for name, uri in stores.items()}
        self.cfg, self.threads, self.cache = cfg, threads, cache
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def view(self, site: str, scan_id: str) -> np.ndarray:
        key = (site, scan_id)
        if key in self._cache:
            return self._cache[key]
        if site not in self.stores:
            raise KeyError(f"no store given for site {site!r} (scan {scan_id}); have {sorted(self.stores)}")
        out = eval_view(self.stores[site].read_volume(scan_id), self.cfg.crop, self.cfg.size)
        if self.cache:
            self._cache[key] = out
        return out

    def __call__(self, sites, scan_ids) -> np.ndarray:
        """(B, size, size, size) int16 views of the given (site, scan id) pairs."""
        pairs = list(zip(sites, scan_ids, strict=True))
        if self.threads <= 1 or len(pairs) <= 1:
            return np.stack([self.view(s, i) for s, i in pairs])
        with ThreadPoolExecutor(self.threads) as pool:
            return np.stack(list(pool.map(lambda p: self.view(*p), pairs)))


def attention_input(backbone_path: str, store_uri: str, scan_id: str, view=None) -> tuple:
    """(model, input, voxel_mm, title) for `write_report(attention=...)` from a stored scan."""
    from fmct_ray.models import load_backbone

    view = view or ViewConfig()
    model = load_backbone(backbone_path).eval()
    volume = SiteStore(store_uri).read_volume(scan_id)
    x = to_model_input(eval_view(volume, view.crop, view.size)[None], view)
    return model, x, view.crop / view.size, f"attention distance, scan {scan_id[:12]}"

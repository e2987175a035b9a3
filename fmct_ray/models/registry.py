"""Named backbone presets, `create_model`, and a standalone backbone file format.

Presets are tiny registered functions returning a `ViT3DConfig` (timm style):

| name                 | input     | patch | width/depth/heads | position    | extras                       |
|----------------------|-----------|-------|-------------------|-------------|------------------------------|
| `vit3d_tiny`         | 3 x 32^3  | 8     | 96/4/4            | sin-cos     | tests; < 1 s fwd+bwd on CPU  |
| `vit3d_tiny_p4`      | 3 x 32^3  | 4     | 96/4/4            | sin-cos     | 512 tokens: the CPU MAE study |
| `vit3d_small`        | 3 x 96^3  | 12    | 384/12/6          | sin-cos     |                              |
| `vit3d_base`         | 3 x 96^3  | 12    | 768/12/12         | sin-cos     | FM-CT, about 89.4 M params   |
| `vit3d_voxelfm_base` | 1 x 112^3 | 14    | 864/12/12         | RoPE (100)  | 4 registers, LS 1e-5, dp 0.1 |
| `vit3d_voxelfm_tiny` | 1 x 32^3  | 8     | 96/4/4            | RoPE (100)  | VoxelFM shape for tests      |

A backbone file (`save_backbone`) holds the weights and the config that built them, so a DINO
teacher can be exported once and reloaded for fine-tuning or embedding extraction without the
training code that made it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fmct_ray.models.vit3d import VisionTransformer3D, ViT3DConfig

FORMAT = "fmct_ray.backbone/1"
_PRESETS: dict[str, Callable[[], ViT3DConfig]] = {}


def register_model(fn: Callable[[], ViT3DConfig]) -> Callable[[], ViT3DConfig]:
    """Register a preset function under its own name."""
    _PRESETS[fn.__name__] = fn
    return fn


@register_model
def vit3d_tiny() -> ViT3DConfig:
    return ViT3DConfig(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=4)


@register_model
def vit3d_tiny_p4() -> ViT3DConfig:
    return ViT3DConfig(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=4)


@register_model
def vit3d_small() -> ViT3DConfig:
    return ViT3DConfig(embed_dim=384, depth=12, num_heads=6)


@register_model
def vit3d_base() -> ViT3DConfig:
    """FM-CT backbone (Zhu et al.): 3x96^3, patch 12 -> 512 tokens + CLS, 768/12/12/3072, sin-cos."""
    return ViT3DConfig()


@register_model
def vit3d_voxelfm_base() -> ViT3DConfig:
    """VoxelFM backbone: 1 channel, patch 14, 864 wide, 3D RoPE base 100, 4 registers, LS, dp 0.1."""
    return ViT3DConfig(
        img_size=112,
        patch_size=14,
        in_chans=1,
        embed_dim=864,
        depth=12,
        num_heads=12,
        pos_embed="rope",
        rope_base=100.0,
        num_registers=4,
        layerscale_init=1e-5,
        drop_path_rate=0.1,
    )


@register_model
def vit3d_voxelfm_tiny() -> ViT3DConfig:
    """VoxelFM-shaped test model (RoPE, registers, LayerScale) at `vit3d_tiny` cost."""
    return dataclasses.replace(
        vit3d_voxelfm_base(), img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=4
    )


def list_models() -> list[str]:
    """Names of the registered presets."""
    return sorted(_PRESETS)


def model_config(name: str, **overrides) -> ViT3DConfig:
    """The preset config `name` with fields replaced by `overrides`."""
    if name not in _PRESETS:
        raise KeyError(f"unknown model {name!r}; known: {list_models()}")
    return dataclasses.replace(_PRESETS[name](), **overrides)


def create_model(name: str, **overrides) -> VisionTransformer3D:
    """Build preset `name`, e.g. `create_model("vit3d_base", drop_path_rate=0.1)`."""
    return VisionTransformer3D(model_config(name, **overrides))


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_backbone(path: str | Path, model: nn.Module, config: ViT3DConfig | None = None) -> Path:
    """Write `model`'s weights and architecture config to one file (parents created).

    Args:
        path: output file (e.g. `teacher_backbone.pt`).
        model: a `VisionTransformer3D`, possibly wrapped in DDP / torch.compile.
        config: the config it was built with; defaults to `model.config`.
    """
    model = _unwrap(model)
    config = config or model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "config": dataclasses.asdict(config), "state_dict": state}, path)
    return path


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu") -> VisionTransformer3D:
    """Rebuild a backbone saved by `save_backbone` (strict load; safe `weights_only` unpickling)."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format={blob.get('format')!r})")
    fields = {f.name for f in dataclasses.fields(ViT3DConfig)}
    config = ViT3DConfig(**{k: v for k, v in blob["config"].items() if k in fields})
    model = VisionTransformer3D(config)
    model.load_state_dict(blob["state_dict"])
    return model

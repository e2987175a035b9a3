"""Backbones and heads: 3D ViT (FM-CT, VoxelFM), DINO head, probes, MAE. No Ray, no devices.

```python
from fmct_ray.models import create_model, save_backbone, load_backbone
net = create_model("vit3d_base")                  # 3x96^3, patch 12, ~89.4 M parameters
out = net.forward_features(x)                     # {"cls": (B, 768), "patch": (B, 512, 768)}
save_backbone("teacher.pt", net); net2 = load_backbone("teacher.pt")
```
"""

from fmct_ray.models.heads import AttentiveProbe, DINOHead, LinearProbe, WeightNormLinear
from fmct_ray.models.layers import Attention, Block, PatchEmbed3D
from fmct_ray.models.mae import MAEDecoder, MaskedAutoencoder3D, patchify, unpatchify
from fmct_ray.models.pos_embed import (
    apply_rope,
    interpolate_pos_embed,
    normalized_coords,
    rope_periods,
    rope_sincos,
    sincos_3d,
)
from fmct_ray.models.registry import (
    create_model,
    list_models,
    load_backbone,
    model_config,
    register_model,
    save_backbone,
)
from fmct_ray.models.vit3d import VisionTransformer3D, ViT3DConfig

__all__ = [
    "Attention",
    "AttentiveProbe",
    "Block",
    "DINOHead",
    "LinearProbe",
    "MAEDecoder",
    "MaskedAutoencoder3D",
    "PatchEmbed3D",
    "ViT3DConfig",
    "VisionTransformer3D",
    "WeightNormLinear",
    "apply_rope",
    "create_model",
    "interpolate_pos_embed",
    "list_models",
    "load_backbone",
    "model_config",
    "normalized_coords",
    "patchify",
    "register_model",
    "rope_periods",
    "rope_sincos",
    "save_backbone",
    "sincos_3d",
    "unpatchify",
]

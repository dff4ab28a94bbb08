"""Tiny timm image towers that the bundled open_clip model configs name.

open_clip builds a SigLIP image tower from a registered timm model name, and timm has
no SigLIP small enough for a seconds-fast test. ``vit_tiny_patch16_siglip_64`` is the
SigLIP architecture (no class token, MAP attention-pool head, pre-norm blocks) at
64 px, 2 blocks of width 64: the image tower of ``model_configs/ViT-tiny-MAP.json``,
random weights only. (That name avoids "siglip": open_clip picks SigLIP's sentencepiece
tokenizer, a download, for any model name containing it; the tiny model uses CLIP's BPE.)
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

TINY_SIGLIP = {
    "img_size": 64,
    "patch_size": 16,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 2,
    "class_token": False,
    "global_pool": "map",
}
"""``vit_base_patch16_siglip_224``'s arguments with the sizes shrunk."""


@register_model
def vit_tiny_patch16_siglip_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """SigLIP's ViT at toy size; ``pretrained`` must stay False (no weights exist)."""
    if pretrained:
        raise ValueError("vit_tiny_patch16_siglip_64 has random weights only")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return VisionTransformer(**{**TINY_SIGLIP, **kwargs})

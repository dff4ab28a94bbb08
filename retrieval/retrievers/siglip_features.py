"""Dense features of SigLIP / SigLIP2 towers: timm ViTs pooled by a MAP attention head.

open_clip builds SigLIP's image tower as a ``TimmModel`` around a timm
``VisionTransformer`` whose ``attn_pool`` (``AttentionPoolLatent``, "MAP") is the last
attention that mixes the patches into the image embedding. It plays the role of the
CLIP ResNet's attention pool, so Dense-CLIP's per-patch embedding is its value path.

The decomposition. With ``t_l`` the patch tokens after the trunk's final norm, ``H``
heads, ``a[h, l]`` head ``h``'s attention of the learned query on patch ``l`` (each row
sums to 1) and ``v[h, l] = W_v[h] t_l + b_v[h]``, the head's output before its MLP is::

    o = b_o + sum_h W_o[:, h] sum_l a[h, l] v[h, l]
      = sum_l sum_h a[h, l] (W_o[:, h] v[h, l]) + b_o

and the head returns ``o + mlp(norm(o))``. A patch's embedding here is what the head
returns when every head attends to that patch alone (``a[h, l] = 1``)::

    u_l = W_o v_l + b_o,      e_l = u_l + mlp(norm(u_l))

then ``fc_norm`` / ``head`` of the trunk and open_clip's head (identities for SigLIP).
The pre-MLP part is exact and linear: ``o`` is the attention-weighted sum, head by head,
of the patches' value-path outputs. The MLP residual is not linear, so the pooled
embedding is not a weighted sum of the ``e_l``; each ``e_l`` is exactly the head's
output on its own patch.

``dense_attention`` picks the trunk's last block: ``maskclip`` leaves it as trained (the
MAP head's value path already is MaskCLIP's skipped query-key mixing), the others
rewrite it as in ``vit_attention`` (SCLIP, ClearCLIP, NACLIP; no class token, so every
token is on the grid).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from timm.layers import AttentionPoolLatent, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import Tensor, nn

from retrieval.errors import ConfigError
from retrieval.retrievers.vit_attention import (
    STANDARD,
    DenseAttention,
    check_dense_attention,
    run_last_block,
    timm_parts,
)

Grid = tuple[int, int]


def is_siglip(visual: nn.Module) -> bool:
    """True for an open_clip timm tower whose trunk is a ViT pooled by a MAP head."""
    return (
        isinstance(visual, TimmModel)
        and isinstance(visual.trunk, TimmViT)
        and isinstance(visual.trunk.attn_pool, AttentionPoolLatent)
    )


def check_siglip(visual: nn.Module) -> None:
    """Raises a ConfigError unless the MAP head has one latent query and no positions."""
    if not is_siglip(visual):
        raise ConfigError(f"expected a timm ViT with a MAP head, got {type(visual).__name__}")
    trunk = cast(TimmViT, visual.trunk)
    pool = trunk.attn_pool
    if pool.latent_len != 1 or pool.pos_embed is not None or pool.pool != "token":
        raise ConfigError("dense features need a MAP head with one latent query and no positions")
    timm_parts(trunk.blocks[-1])


def siglip_tokens(trunk: TimmViT, pixels: Tensor) -> tuple[Tensor, Grid]:
    """``[B, prefix + h*w, C]`` input of the first block, and the patch grid.

    As timm's ``patch_embed`` + ``_pos_embed`` + ``norm_pre``, for any input size: the
    patch convolution is applied directly (timm's fixed-size check skipped) and the
    positional table resampled as timm's ``dynamic_img_size`` does.
    """
    embed = trunk.patch_embed
    x = embed.proj(pixels.to(embed.proj.weight.dtype))
    grid = (x.shape[-2], x.shape[-1])
    x = embed.norm(x.flatten(2).transpose(1, 2))
    prefix = [
        t.expand(x.shape[0], -1, -1).to(x.dtype)
        for t in (trunk.cls_token, trunk.reg_token)
        if t is not None
    ]
    if trunk.pos_embed is None:
        x = torch.cat([*prefix, x], dim=1)
    else:
        pos = resample_abs_pos_embed(
            trunk.pos_embed,
            new_size=list(grid),
            old_size=list(embed.grid_size),
            num_prefix_tokens=0 if trunk.no_embed_class else trunk.num_prefix_tokens,
        ).to(x.dtype)
        if trunk.no_embed_class:  # positions for the grid only, prefix tokens after
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
    return trunk.norm_pre(trunk.patch_drop(trunk.pos_drop(x))), grid


def map_value_path(visual: TimmModel, tokens: Tensor) -> Tensor:
    """``[B, N, D]``: each token's ``e_l`` (module docstring), through the MAP head's value
    rows, ``proj``, the MLP residual and every per-vector map after the pool."""
    trunk = visual.trunk
    pool = trunk.attn_pool
    width = pool.kv.out_features // 2  # kv rows: keys, then values
    bias = None if pool.kv.bias is None else pool.kv.bias[width:]
    u = pool.proj(F.linear(tokens, pool.kv.weight[width:], bias))
    e = u + pool.mlp(pool.norm(u)) if pool.mlp is not None else u
    return visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(e))))


def siglip_dense_features(
    visual: TimmModel,
    pixels: Tensor,
    with_global: bool = True,
    attention: DenseAttention = "maskclip",
) -> tuple[Tensor, Grid, Tensor | None]:
    """Dense embeddings ``[B, h*w, D]``, their grid and the global embedding ``[B, D]``.

    Every trunk block but the last runs as usual; the last runs as trained for the
    global embedding (then the real MAP head: open_clip's ``encode_image`` at the native
    size) and as ``attention`` says for the patches, whose tokens then take the MAP
    head's value path (:func:`map_value_path`).

    Args:
        visual: ``model.visual`` of an open_clip SigLIP / SigLIP2 model.
        pixels: ``[B, 3, H, W]`` normalised images, any size (grid = size / patch).
        with_global: also compute the image embedding from the same pass.
        attention: the trunk's last block for the patches (``maskclip``: as trained).
    """
    check_siglip(visual)
    spec = check_dense_attention(attention)
    trunk = visual.trunk
    x, grid = siglip_tokens(trunk, pixels)
    for block in trunk.blocks[:-1]:
        x = block(x)
    last = trunk.blocks[-1]
    global_embedding = visual.head(trunk.forward_head(trunk.norm(last(x)))) if with_global else None
    prefix = trunk.num_prefix_tokens
    block_spec = STANDARD if attention == "maskclip" else spec
    tokens = trunk.norm(run_last_block(timm_parts(last), x, block_spec, grid, prefix))
    return map_value_path(visual, tokens[:, prefix:]), grid, global_embedding

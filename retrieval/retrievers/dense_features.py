"""Dense CLIP features: one embedding per feature-map location of an open_clip image tower.

Pure functions on open_clip's own modules (no retriever state), so Dense-CLIP and
Cluster-CLIP share one implementation and tests can check each identity against
open_clip's forward. Features come back unnormalised, because the identities tying them
to the global embedding are linear; callers L2-normalise.

By default every family follows MaskCLIP (Zhou et al., ECCV 2022): a location's
embedding is what the last attention layer's value path makes of that location alone,
with the query-key mixing skipped, so it lands in the joint image-text space without
training. ViTs (open_clip's and SigLIP's timm towers) also take SCLIP, ClearCLIP and
NACLIP's rewrites of the last block (``vit_attention``); SigLIP's MAP head is read
through its value path (``siglip_features``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from retrieval.errors import ConfigError
from retrieval.retrievers.siglip_features import check_siglip, is_siglip, siglip_dense_features
from retrieval.retrievers.vit_attention import (
    DenseAttention,
    check_dense_attention,
    open_clip_parts,
    run_last_block,
)

Grid = tuple[int, int]


class DenseFeatures(NamedTuple):
    """One backbone pass: per-location embeddings, their grid, and the image's embedding.

    Attributes:
        dense: ``[B, h*w, D]`` unnormalised embeddings in raster order (row by row).
        grid: ``(h, w)`` of the feature map.
        global_embedding: ``[B, D]`` unnormalised image embedding from the same pass, or
            None when it was not asked for (it costs ~5% of a ResNet pass).
    """

    dense: Tensor
    grid: Grid
    global_embedding: Tensor | None


def square_grid(num_positions: int) -> Grid:
    """The ``(s, s)`` grid of a positional table of ``1 + s*s`` rows (token 0 first)."""
    side = math.isqrt(num_positions - 1)
    if side * side != num_positions - 1:
        raise ValueError(f"a positional table of {num_positions} rows is not 1 + a square grid")
    return side, side


def interpolate_positions(pos: Tensor, grid: Grid, size: Grid) -> Tensor:
    """Resizes a ``[1 + g0*g1, C]`` positional table to ``[1 + h*w, C]``.

    Token 0 (the class token, or the ResNet pool's mean token) has no place on the grid
    and is kept; the grid part is resized bicubically with open_clip's own settings
    (``resize_pos_embed``), so a model loaded at another size gets the same table.
    """
    src, dst = tuple(grid), tuple(size)
    if src == dst:
        return pos
    channels = pos.shape[-1]
    work = pos.dtype if pos.dtype in (torch.float32, torch.float64) else torch.float32
    cells = pos[1:].reshape(1, *src, channels).permute(0, 3, 1, 2).to(work)
    cells = F.interpolate(cells, size=dst, mode="bicubic", antialias=True, align_corners=False)
    cells = cells.permute(0, 2, 3, 1).reshape(dst[0] * dst[1], channels)
    return torch.cat([pos[:1], cells.to(pos.dtype)])


def resnet_feature_map(visual: ModifiedResNet, pixels: Tensor) -> Tensor:
    """``[B, C, h, w]``: the ModifiedResNet up to (not including) its attention pool."""
    x = visual.stem(pixels.to(visual.conv1.weight.dtype))
    return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))


def attnpool_tokens(attnpool: AttentionPool2d, features: Tensor) -> Tensor:
    """``[B, 1 + h*w, C]``: the pool's input, the mean token then every location.

    Exactly what ``AttentionPool2d.forward`` builds, except that the positional table is
    interpolated to the grid (open_clip's pool only accepts its native grid).
    """
    x = features.flatten(2).transpose(1, 2)
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
    table = attnpool.positional_embedding
    h, w = features.shape[-2:]
    pos = interpolate_positions(table, square_grid(table.shape[0]), (h, w))
    return x + pos.to(x.dtype)


def attnpool_attention(attnpool: AttentionPool2d, tokens: Tensor) -> Tensor:
    """``[B, H, L]``: each head's attention of the mean token (the pool's query) over all."""
    heads = attnpool.num_heads
    batch, length, channels = tokens.shape
    head_dim = channels // heads
    q = attnpool.q_proj(tokens[:, 0]).view(batch, heads, head_dim)
    k = attnpool.k_proj(tokens).view(batch, length, heads, head_dim)
    logits = torch.einsum("bhd,blhd->bhl", q, k) * head_dim**-0.5
    return logits.softmax(dim=-1)


def attnpool_output(attnpool: AttentionPool2d, tokens: Tensor, values: Tensor) -> Tensor:
    """``[B, D]``: the pool's output, head by head the attention-weighted sum of values.

    Each head mixes its own slice of the value vectors with its own weights before
    ``c_proj`` joins the heads; averaging the weights over heads first is not exact.
    """
    weights = attnpool_attention(attnpool, tokens)
    batch, length, channels = values.shape
    per_head = values.view(batch, length, attnpool.num_heads, -1)
    mixed = torch.einsum("bhl,blhd->bhd", weights, per_head).reshape(batch, channels)
    return attnpool.c_proj(mixed)


def resnet_dense_features(
    visual: ModifiedResNet, pixels: Tensor, positional: bool = False, with_global: bool = True
) -> DenseFeatures:
    """Dense-CLIP on a ModifiedResNet: ``c_proj(v_proj(x_l [+ pos_l]))`` per location.

    The global embedding is the attention pool's real output on the same feature map
    (positions interpolated when the grid is not native), so it costs one query, not a
    second backbone pass.

    Args:
        visual: ``model.visual`` of an open_clip ResNet CLIP.
        pixels: ``[B, 3, H, W]`` normalised images, any size (grid = size / 32).
        positional: add the interpolated positional term ``pos_l`` to each location
            before ``v_proj``. MaskCLIP leaves it out: it carries where a cell is, not
            what it shows.
        with_global: also compute the pool's output (the global embedding).
    """
    pool = visual.attnpool
    features = resnet_feature_map(visual, pixels)
    global_embedding = None
    if with_global or positional:
        tokens = attnpool_tokens(pool, features)
        values = pool.v_proj(tokens)
        if with_global:
            global_embedding = attnpool_output(pool, tokens, values)
    cells = values[:, 1:] if positional else pool.v_proj(features.flatten(2).transpose(1, 2))
    grid = (features.shape[-2], features.shape[-1])
    return DenseFeatures(pool.c_proj(cells), grid, global_embedding)


def _check_vit(visual: VisionTransformer) -> None:
    last = visual.transformer.resblocks[-1]
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        raise ConfigError("dense features need a ViT pooled by its class token or mean token")
    if not isinstance(last, ResidualAttentionBlock) or not last.attn._qkv_same_embed_dim:
        raise ConfigError(
            f"dense features need open_clip's standard ResidualAttentionBlock, got "
            f"{type(last).__name__}"
        )


def vit_tokens(visual: VisionTransformer, pixels: Tensor) -> tuple[Tensor, Grid]:
    """``[B, 1 + h*w, W]`` transformer input (class token first) and the patch grid.

    As ``VisionTransformer._embeds``, with the positional table interpolated to the grid
    and no patch dropout (every patch must keep its place).
    """
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + interpolate_positions(visual.positional_embedding, visual.grid_size, grid).to(x.dtype)
    return visual.ln_pre(x), grid


def vit_pool(visual: VisionTransformer, x: Tensor) -> Tensor:
    """``[B, D]``: the image embedding from the last block's output, as open_clip pools."""
    if not visual.final_ln_after_pool:
        x = visual.ln_post(x)
    pooled = x[:, 0] if visual.pool_type == "tok" else x[:, 1:].mean(dim=1)
    if visual.final_ln_after_pool:
        pooled = visual.ln_post(pooled)
    return pooled @ visual.proj


def _apply_block(block: nn.Module, x: Tensor, batch_first: bool) -> Tensor:
    return block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)


def vit_dense_features(
    visual: VisionTransformer,
    pixels: Tensor,
    with_global: bool = True,
    attention: DenseAttention = "maskclip",
) -> DenseFeatures:
    """Dense-CLIP on a ViT: patch tokens through a rewritten last block.

    Every block but the last runs as usual (positions interpolated to the input size);
    the last one runs as ``attention`` says (``vit_attention``: MaskCLIP's value path,
    SCLIP, ClearCLIP or NACLIP), then ``ln_post`` and ``proj`` map the patch tokens into
    the joint space. The global embedding is the class token through the real last block,
    from the same pass.

    Args:
        visual: ``model.visual`` of an open_clip ViT CLIP.
        pixels: ``[B, 3, H, W]`` normalised images, any size (grid = size / patch).
        with_global: also run the real last block for the class token's embedding.
        attention: the last block's variant (``retriever.dense_attention``).
    """
    _check_vit(visual)
    spec = check_dense_attention(attention)
    x, grid = vit_tokens(visual, pixels)
    blocks = visual.transformer.resblocks
    batch_first = visual.transformer.batch_first
    for block in blocks[:-1]:
        x = _apply_block(block, x, batch_first)
    global_embedding = (
        vit_pool(visual, _apply_block(blocks[-1], x, batch_first)) if with_global else None
    )
    tokens = run_last_block(open_clip_parts(blocks[-1]), x, spec, grid, prefix=1)
    dense = visual.ln_post(tokens[:, 1:]) @ visual.proj
    return DenseFeatures(dense, grid, global_embedding)


def is_resnet(visual: nn.Module) -> bool:
    """True for open_clip's ModifiedResNet towers (RN50, RN50x4, RN50x64, RN-tiny)."""
    return isinstance(visual, ModifiedResNet)


def check_supported(visual: nn.Module, attention: str = "maskclip") -> None:
    """Raises a ConfigError naming the tower or the option when there is no dense-feature
    formulation here for it."""
    check_dense_attention(attention)
    if is_resnet(visual):
        if attention != "maskclip":
            raise ConfigError(
                f"retriever.dense_attention={attention!r} rewrites a ViT's last block; a "
                f"ResNet's attention pool takes maskclip only"
            )
        return
    if isinstance(visual, VisionTransformer):
        _check_vit(visual)
        return
    if is_siglip(visual):
        check_siglip(visual)
        return
    raise ConfigError(
        f"dense features need an open_clip ModifiedResNet or VisionTransformer image tower, "
        f"or a timm ViT with a MAP head (SigLIP), got {type(visual).__name__}"
    )


def dense_features(
    visual: nn.Module,
    pixels: Tensor,
    positional: bool = False,
    with_global: bool = True,
    attention: DenseAttention = "maskclip",
) -> DenseFeatures:
    """Dispatches to :func:`resnet_dense_features`, :func:`vit_dense_features` or
    :func:`~retrieval.retrievers.siglip_features.siglip_dense_features`.

    ``positional`` applies to ResNets only: a ViT adds its positions at the input.
    ``with_global=False`` skips the global embedding (Dense-CLIP without "CLIP + X").
    ``attention`` (ViTs only) picks the last block's variant (``vit_attention``).
    """
    check_supported(visual, attention)
    if is_resnet(visual):
        return resnet_dense_features(visual, pixels, positional, with_global)
    if positional:
        raise ConfigError("positional=True applies to ResNet backbones (the attention pool) only")
    if is_siglip(visual):
        return DenseFeatures(*siglip_dense_features(visual, pixels, with_global, attention))
    return vit_dense_features(visual, pixels, with_global, attention)

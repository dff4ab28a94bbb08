"""The last ViT block rewritten for dense features: MaskCLIP, SCLIP, ClearCLIP, NACLIP.

A CLIP ViT's last attention layer pulls every patch token towards image-level content
(the class token's job), so its patch outputs match text poorly. Training-free dense
methods rewrite that one block; each is three switches here (:class:`LastBlock`): how
tokens attend (the attention weights ``A``), whether the residual stream is kept, and
whether the FFN runs. With the standard switches (``A = softmax(q k^T s)``, residual,
FFN) the block is open_clip's / timm's own, so every variant is a documented edit of
the real forward, not a re-implementation of it.

Notation, per head ``h`` (``d`` its width, ``s = d^-1/2``): ``z = norm_1(x)``;
``q, k, v`` the block's own projections of ``z``; ``A`` an ``[L, L]`` weight matrix;
``a = W_o [A_1 v_1 | ... | A_H v_H] + b_o`` the attention output. The block returns
``y = x + ls_1(a)`` with the residual, ``ls_1(a)`` without; then
``y + ls_2(mlp(norm_2(y)))`` with the FFN.

Variants (``retriever.dense_attention``):

* ``maskclip`` (Zhou et al., ECCV 2022, "Extract Free Dense Labels from CLIP", Sec. 3.2):
  ``A = I``, each token takes its own value; residual and FFN kept.
* ``sclip`` (Wang et al., ECCV 2024, "SCLIP: Rethinking Self-Attention for Dense
  Vision-Language Inference", Sec. 3.2, correlative self-attention, training-free form
  reusing CLIP's projections): ``A = softmax(q q^T s) + softmax(k k^T s)`` (rows sum to 2,
  as published); residual and FFN kept, as the authors' released code does.
* ``clearclip`` (Lan et al., ECCV 2024, "ClearCLIP: Decomposing CLIP Representations for
  Dense Vision-Language Inference", Sec. 3-4): ``A = softmax(q q^T s)``, residual and FFN
  removed, so the output is ``W_o (A v) + b_o`` alone.
* ``naclip`` (Hajimiri et al., WACV 2025, "Pay Attention to Your Neighbours:
  Training-Free Open-Vocabulary Semantic Segmentation", Sec. 3, neighbourhood-aware
  attention and the reduced architecture): ``A = softmax(k k^T s + omega)`` with
  ``omega[i, j] = exp(-|p_i - p_j|^2 / (2 sigma^2))`` over the patch grid positions
  ``p`` (``sigma = 5`` patches, the paper's value; ``omega = 0`` in the rows and columns
  of non-grid tokens such as the class token); residual and FFN removed.

All variants attend over every token of the last block's input, the class token
included, as the papers do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from retrieval.errors import ConfigError

DenseAttention = Literal["maskclip", "sclip", "clearclip", "naclip"]
DENSE_ATTENTIONS: tuple[str, ...] = get_args(DenseAttention)
Mixing = Literal["qk", "self", "qq+kk", "qq", "kk+gauss"]
NACLIP_SIGMA = 5.0
"""NACLIP's Gaussian width in patches (its default for every dataset)."""


@dataclass(frozen=True)
class LastBlock:
    """How the last block runs: its attention weights, residual and FFN switches."""

    mixing: Mixing = "qk"
    residual: bool = True
    ffn: bool = True
    sigma: float = NACLIP_SIGMA


STANDARD = LastBlock()
"""The block as trained: open_clip's / timm's own forward."""
VARIANTS: dict[str, LastBlock] = {
    "maskclip": LastBlock("self", residual=True, ffn=True),
    "sclip": LastBlock("qq+kk", residual=True, ffn=True),
    "clearclip": LastBlock("qq", residual=False, ffn=False),
    "naclip": LastBlock("kk+gauss", residual=False, ffn=False),
}


class BlockParts(NamedTuple):
    """A pre-norm transformer block as functions, whichever library built it."""

    norm_1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]  # z -> q, k, v [B, H, L, d]
    out: Callable[[Tensor], Tensor]  # [B, L, H*d] -> [B, L, W] (W_o, b_o)
    ls_1: Callable[[Tensor], Tensor]
    norm_2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    ls_2: Callable[[Tensor], Tensor]


def check_dense_attention(value: str) -> LastBlock:
    """The :class:`LastBlock` of a ``retriever.dense_attention`` value."""
    if value not in VARIANTS:
        raise ConfigError(
            f"retriever.dense_attention={value!r} must be one of {', '.join(DENSE_ATTENTIONS)}"
        )
    return VARIANTS[value]


def _heads(t: Tensor, heads: int) -> Tensor:
    batch, length, width = t.shape
    return t.view(batch, length, heads, width // heads).transpose(1, 2)


def open_clip_parts(block: nn.Module) -> BlockParts:
    """:class:`BlockParts` of open_clip's ``ResidualAttentionBlock`` (a packed
    ``nn.MultiheadAttention``: ``in_proj`` rows are ``q``, ``k``, ``v``)."""
    if not isinstance(block, ResidualAttentionBlock) or not block.attn._qkv_same_embed_dim:
        raise ConfigError(
            f"dense_attention needs open_clip's standard ResidualAttentionBlock, got "
            f"{type(block).__name__}"
        )
    attn = block.attn
    heads = attn.num_heads

    def qkv(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = F.linear(z, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        return _heads(q, heads), _heads(k, heads), _heads(v, heads)

    return BlockParts(block.ln_1, qkv, attn.out_proj, block.ls_1, block.ln_2, block.mlp, block.ls_2)


def timm_parts(block: nn.Module) -> BlockParts:
    """:class:`BlockParts` of timm's ViT ``Block`` (SigLIP, SigLIP2): fused ``qkv``, optional
    q/k norms and the ``scale_norm`` before ``proj``; drop paths are identities in eval."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    attn = getattr(block, "attn", None)
    if type(block) is not Block or type(attn) is not Attention or attn.gate is not None:
        raise ConfigError(
            f"dense features need timm's standard ViT Block, got {type(block).__name__}"
        )

    def qkv(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, length, _ = z.shape
        packed = attn.qkv(z).reshape(batch, length, 3, attn.num_heads, attn.head_dim)
        q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def out(a: Tensor) -> Tensor:
        return attn.proj(attn.norm(a))

    return BlockParts(block.norm1, qkv, out, block.ls1, block.norm2, block.mlp, block.ls2)


def gaussian_bias(grid: tuple[int, int], prefix: int, sigma: float, like: Tensor) -> Tensor:
    """``[L, L]`` NACLIP's ``omega``: ``exp(-|p_i - p_j|^2 / 2 sigma^2)`` between grid
    tokens (raster order, after ``prefix`` non-grid tokens), 0 where a prefix token is."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], device=like.device),
        torch.arange(grid[1], device=like.device),
        indexing="ij",
    )
    points = torch.stack([rows.flatten(), cols.flatten()], dim=1).double()  # any precision
    omega = torch.exp(-torch.cdist(points, points).square() / (2 * sigma**2))
    return F.pad(omega, (prefix, 0, prefix, 0)).to(like.dtype)


def mix(
    q: Tensor, k: Tensor, v: Tensor, spec: LastBlock, grid: tuple[int, int], prefix: int
) -> Tensor:
    """``[B, L, H*d]``: each head's ``A v``, heads concatenated (``self``: ``v`` itself).

    Each softmax term is one ``scaled_dot_product_attention`` call (scale ``d^-1/2``, an
    additive float mask for NACLIP's ``omega``), torch's fused kernel where it has one, so
    a variant costs what the trained block's attention costs (SCLIP: two of them).
    """
    attend = F.scaled_dot_product_attention
    if spec.mixing == "self":
        mixed = v
    elif spec.mixing == "qk":
        mixed = attend(q, k, v)
    elif spec.mixing == "qq":
        mixed = attend(q, q, v)
    elif spec.mixing == "qq+kk":
        mixed = attend(q, q, v) + attend(k, k, v)
    elif spec.mixing == "kk+gauss":
        mixed = attend(k, k, v, attn_mask=gaussian_bias(grid, prefix, spec.sigma, k))
    else:
        raise ValueError(f"unknown mixing {spec.mixing!r}")
    batch, heads, length, dim = mixed.shape
    return mixed.transpose(1, 2).reshape(batch, length, heads * dim)


def run_last_block(
    parts: BlockParts, x: Tensor, spec: LastBlock, grid: tuple[int, int], prefix: int
) -> Tensor:
    """``[B, L, W]``: the block on batch-first tokens ``x`` (``prefix`` non-grid tokens first,
    then the ``grid`` in raster order) under ``spec``'s switches."""
    q, k, v = parts.qkv(parts.norm_1(x))
    a = parts.ls_1(parts.out(mix(q, k, v, spec, grid, prefix)))
    y = x + a if spec.residual else a
    return y + parts.ls_2(parts.mlp(parts.norm_2(y))) if spec.ffn else y

"""SigLIP towers (timm ViT + MAP head) against open_clip's own forward.

ViT-tiny-MAP is SigLIP's image architecture at toy size (no class token, a MAP
attention-pool head, timm blocks), random weights, float64. Checked: the global embedding
is open_clip's ``encode_image``; the MAP head's pre-MLP output is the attention-weighted
sum, head by head, of the patches' value-path outputs; each dense cell is exactly the
head's output when it attends to that patch alone.
"""

from __future__ import annotations

import copy
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import retrieval.retrievers.openclip_loader  # noqa: F401  (registers ViT-tiny-MAP)
from retrieval import create_retriever
from retrieval.retrievers.dense_features import check_supported, dense_features
from retrieval.retrievers.siglip_features import is_siglip, siglip_tokens

os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.filterwarnings("ignore:retriever.pretrained=null")


def exact(actual: Tensor, expected: Tensor) -> None:
    """Equal to float64 rounding, relative to the vectors' scale."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10 * expected.abs().max().item())


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-tiny-MAP").double().eval()
    with torch.no_grad():  # a peaked, head-specific pool attention (init: a zero latent)
        model.visual.trunk.attn_pool.latent.normal_(0, 3)
    return model


def pool_input(model: nn.Module, pixels: Tensor) -> Tensor:
    """The MAP head's input during open_clip's own forward (the trunk's normed tokens)."""
    captured = []
    pool = model.visual.trunk.attn_pool
    hook = pool.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        model.encode_image(pixels)
    finally:
        hook.remove()
    return captured[0]


def test_tiny_tower_is_siglips_architecture(model):
    """The tiny config builds SigLIP's layout: a timm ViT, no class token, a MAP head,
    open_clip's projection-free head; the dense formulation accepts it."""
    visual = model.visual
    assert is_siglip(visual)
    assert visual.trunk.cls_token is None
    assert visual.trunk.num_prefix_tokens == 0
    assert len(visual.head) == 0
    check_supported(visual, "naclip")


@pytest.mark.parametrize("attention", ["maskclip", "clearclip"])
@torch.no_grad()
def test_global_embedding_is_encode_image(model, attention):
    """Invariant: the global embedding from the dense pass is open_clip's ``encode_image``
    at the native size, whatever the patches' last block."""
    pixels = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out = dense_features(model.visual, pixels, attention=attention)
    assert out.grid == (4, 4)
    assert out.dense.shape == (2, 16, 64)
    exact(out.global_embedding, model.encode_image(pixels))


@torch.no_grad()
def test_tokens_are_the_trunks_at_native_size(model):
    """Invariant: our first-block input is timm's own (patch embed + positions + norm_pre)."""
    trunk = model.visual.trunk
    pixels = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    tokens, grid = siglip_tokens(trunk, pixels)
    exact(tokens, trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(pixels))))
    assert grid == (4, 4)


@torch.no_grad()
def test_pre_mlp_pool_output_is_attention_weighted_sum_of_value_paths(model):
    """Invariant: the MAP head's output before its MLP is ``b_o + sum_h sum_l a[h, l]
    W_o[:, h] v[h, l]``, per-patch value-path outputs summed with each head's own
    attention (written out here with the head's raw weights); averaging the attention
    over heads first is not (the latent is peaked and head-specific)."""
    pool = model.visual.trunk.attn_pool
    pixels = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    t = pool_input(model, pixels)
    captured = []
    hook = pool.proj.register_forward_hook(lambda _, __, out: captured.append(out))
    try:
        pool(t)
    finally:
        hook.remove()
    pre_mlp = captured[0][:, 0]

    width, heads = t.shape[-1], pool.num_heads
    d = width // heads
    wk, wv = pool.kv.weight[:width], pool.kv.weight[width:]
    bk, bv = pool.kv.bias[:width], pool.kv.bias[width:]
    q = pool.q(pool.latent)[0, 0]
    k = t @ wk.T + bk
    v = t @ wv.T + bv
    total = pool.proj.bias.expand(2, -1).clone()
    weights = []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        a = (k[..., s] @ q[s] * d**-0.5).softmax(-1)  # [B, L]
        weights.append(a)
        total += torch.einsum("bl,ble,oe->bo", a, v[..., s], pool.proj.weight[:, s])
    exact(total, pre_mlp)

    averaged = torch.stack(weights).mean(0)
    value_paths = pool.proj(v)  # u_l = W_o v_l + b_o, per patch
    shared = torch.einsum("bl,blo->bo", averaged, value_paths)
    assert (shared - pre_mlp).norm() > 1e-3 * pre_mlp.norm()


@torch.no_grad()
def test_each_cell_is_the_head_attending_to_its_patch_alone(model):
    """Invariant: with ``maskclip`` (trunk as trained), cell ``l`` is exactly the MAP
    head's output (MLP residual included) when its attention is masked to patch ``l``."""
    visual = model.visual
    pixels = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out = dense_features(visual, pixels)
    t = pool_input(model, pixels)
    for cell in (0, 5, 15):
        mask = torch.full((1, t.shape[1]), -torch.inf, dtype=t.dtype)
        mask[0, cell] = 0
        alone = visual.head(visual.trunk.attn_pool(t, attn_mask=mask))
        exact(out.dense[:, cell], alone)


@torch.no_grad()
def test_enlarged_input_resamples_positions_as_timm(model):
    """Invariant: at 128 px (8 x 8 grid) our first-block input is the trunk's own after
    timm's ``set_input_size(128)`` (what open_clip's ``TimmModel.set_input_size`` calls),
    without modifying the model; the dense cells and global embedding are finite."""
    pixels = torch.randn(1, 3, 128, 128, dtype=torch.float64)
    resized = copy.deepcopy(model.visual.trunk)
    resized.set_input_size(img_size=128)
    tokens, grid = siglip_tokens(model.visual.trunk, pixels)
    assert grid == (8, 8)
    exact(tokens, resized.norm_pre(resized._pos_embed(resized.patch_embed(pixels))))
    out = dense_features(model.visual, pixels, attention="naclip")
    assert out.dense.shape == (1, 64, 64)
    assert torch.isfinite(out.dense).all()
    assert torch.isfinite(out.global_embedding).all()


def test_retrievers_run_on_the_siglip_tower():
    """Dense-CLIP and Cluster-CLIP build on the SigLIP tower, embed to the joint width,
    and the appended global representative is the normalised ``encode_image``."""
    dense = create_retriever(
        "dense_clip", backbone="ViT-tiny-MAP", pretrained=None, with_global=True
    )
    pixels = torch.randn(2, 3, 64, 64)
    reps = dense.encode_images(pixels)
    assert reps.embeddings.shape == (2, 17, 64)
    with torch.no_grad():
        expected = F.normalize(dense.model.encode_image(pixels), dim=-1)
    torch.testing.assert_close(reps.embeddings[:, -1], expected, rtol=0, atol=1e-5)
    assert dense.encode_text(["a red circle"]).shape == (1, 64)
    cluster = create_retriever(
        "cluster_clip",
        backbone="ViT-tiny-MAP",
        pretrained=None,
        dense_attention="sclip",
        aggregate={"method": "kmeans", "k": 4},
    )
    assert cluster.encode_images(pixels).counts.max() <= 4

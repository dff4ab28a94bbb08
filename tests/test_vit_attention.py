"""The rewritten last ViT block (MaskCLIP, SCLIP, ClearCLIP, NACLIP) against written-out references.

Each variant's equations are written out here a second time, head by head with plain
einsums on the block's raw weights (never through ``vit_attention``), and the block with
every switch in its standard position must be open_clip's / timm's own block. Random
weights, float64, tiny towers (ViT-tiny, ViT-tiny-MAP).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import retrieval.retrievers.openclip_loader  # noqa: F401  (registers ViT-tiny, ViT-tiny-MAP)
from retrieval import create_retriever
from retrieval.config import CONFIG_DIR, load_config
from retrieval.errors import ConfigError
from retrieval.registry import RETRIEVERS
from retrieval.retrievers.dense_features import dense_features
from retrieval.retrievers.vit_attention import (
    DENSE_ATTENTIONS,
    STANDARD,
    VARIANTS,
    open_clip_parts,
    run_last_block,
    timm_parts,
)

os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.filterwarnings("ignore:retriever.pretrained=null")
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def exact(actual: Tensor, expected: Tensor) -> None:
    """Equal to float64 rounding, relative to the vectors' scale."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10 * expected.abs().max().item())


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model("ViT-tiny").double().eval()


@pytest.fixture(scope="module")
def siglip() -> nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model("ViT-tiny-MAP").double().eval()


def last_block_input(blocks: nn.Module, run, pixels: Tensor) -> Tensor:
    captured = []
    hook = blocks[-1].register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        run(pixels)
    finally:
        hook.remove()
    return captured[0]


# ---------------------------------------------------------------- written-out references


def layer_norm(norm: nn.Module, x: Tensor) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def split_qkv(w: Tensor, b: Tensor, out: nn.Linear, heads: int) -> dict[str, Tensor]:
    """Raw matrices from a packed qkv projection: W_q, W_k, W_v (and biases), W_o."""
    width = w.shape[1]
    return {
        "wq": w[:width], "wk": w[width : 2 * width], "wv": w[2 * width :],
        "bq": b[:width], "bk": b[width : 2 * width], "bv": b[2 * width :],
        "wo": out.weight, "bo": out.bias, "heads": heads,
    }  # fmt: skip


def open_clip_weights(block: nn.Module) -> dict[str, Tensor]:
    attn = block.attn
    return split_qkv(attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, attn.num_heads)


def timm_weights(block: nn.Module) -> dict[str, Tensor]:
    attn = block.attn
    return split_qkv(attn.qkv.weight, attn.qkv.bias, attn.proj, attn.num_heads)


def gaussian(grid: tuple[int, int], prefix: int, sigma: float = 5.0) -> Tensor:
    """NACLIP's omega with loops: exp(-dist^2 / 2 sigma^2) between grid cells, 0 elsewhere."""
    n = prefix + grid[0] * grid[1]
    omega = torch.zeros(n, n, dtype=torch.float64)
    for i in range(grid[0] * grid[1]):
        for j in range(grid[0] * grid[1]):
            (ri, ci), (rj, cj) = divmod(i, grid[1]), divmod(j, grid[1])
            omega[prefix + i, prefix + j] = math.exp(
                -((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * sigma**2)
            )
    return omega


def reference_block(
    variant: str, w: dict, norm_1, norm_2, mlp, x: Tensor, grid: tuple[int, int], prefix: int
) -> Tensor:
    """The paper's equations, head by head, on the block's raw weights."""
    z = layer_norm(norm_1, x)
    q = torch.einsum("bld,ed->ble", z, w["wq"]) + w["bq"]
    k = torch.einsum("bld,ed->ble", z, w["wk"]) + w["bk"]
    v = torch.einsum("bld,ed->ble", z, w["wv"]) + w["bv"]
    heads, width = w["heads"], x.shape[-1]
    d = width // heads
    s = d**-0.5
    out = torch.zeros_like(x)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        qh, kh, vh = q[..., sl], k[..., sl], v[..., sl]
        if variant == "standard":
            a = (torch.einsum("bid,bjd->bij", qh, kh) * s).softmax(-1)
        elif variant == "maskclip":
            a = torch.eye(x.shape[1], dtype=x.dtype).expand(x.shape[0], -1, -1)
        elif variant == "sclip":
            a = (torch.einsum("bid,bjd->bij", qh, qh) * s).softmax(-1) + (
                torch.einsum("bid,bjd->bij", kh, kh) * s
            ).softmax(-1)
        elif variant == "clearclip":
            a = (torch.einsum("bid,bjd->bij", qh, qh) * s).softmax(-1)
        elif variant == "naclip":
            logits = torch.einsum("bid,bjd->bij", kh, kh) * s + gaussian(grid, prefix)
            a = logits.softmax(-1)
        out += torch.einsum("bij,bjd,ed->bie", a, vh, w["wo"][:, sl])
    attn = out + w["bo"]
    residual = variant in ("standard", "maskclip", "sclip")
    y = x + attn if residual else attn
    return y + mlp(layer_norm(norm_2, y)) if residual else y


# ---------------------------------------------------------------- the block


@torch.no_grad()
def test_standard_switches_are_open_clips_own_block(vit):
    """Invariant: standard q-k attention, residual on, FFN on = open_clip's last block."""
    block = vit.visual.transformer.resblocks[-1]
    x = torch.randn(2, 1 + 16, 64, dtype=torch.float64)
    ours = run_last_block(open_clip_parts(block), x, STANDARD, (4, 4), prefix=1)
    assert (ours - block(x)).abs().max() < 1e-6
    exact(ours, block(x))


@torch.no_grad()
def test_standard_switches_are_timms_own_block(siglip):
    """Invariant: the same for timm's ViT Block (SigLIP's trunk, no class token)."""
    block = siglip.visual.trunk.blocks[-1]
    x = torch.randn(2, 16, 64, dtype=torch.float64)
    exact(run_last_block(timm_parts(block), x, STANDARD, (4, 4), prefix=0), block(x))


@pytest.mark.parametrize("variant", ["standard", *DENSE_ATTENTIONS])
@torch.no_grad()
def test_variant_equals_its_written_out_equations(vit, variant):
    """Invariant: each variant (and the standard block) equals its equations written
    out head by head; on a non-square 3 x 5 grid, so NACLIP's kernel must be in raster
    order with the class token outside it."""
    block = vit.visual.transformer.resblocks[-1]
    grid = (3, 5)
    x = torch.randn(2, 1 + 15, 64, dtype=torch.float64)
    spec = STANDARD if variant == "standard" else VARIANTS[variant]
    ours = run_last_block(open_clip_parts(block), x, spec, grid, prefix=1)
    w = open_clip_weights(block)
    exact(ours, reference_block(variant, w, block.ln_1, block.ln_2, block.mlp, x, grid, 1))


@pytest.mark.parametrize("variant", DENSE_ATTENTIONS)
@torch.no_grad()
def test_timm_variant_equals_its_written_out_equations(siglip, variant):
    """Invariant: the same on timm's block (no prefix token: every token on the grid)."""
    block = siglip.visual.trunk.blocks[-1]
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    ours = run_last_block(timm_parts(block), x, VARIANTS[variant], (3, 4), prefix=0)
    w = timm_weights(block)
    exact(ours, reference_block(variant, w, block.norm1, block.norm2, block.mlp, x, (3, 4), 0))


@torch.no_grad()
def test_variants_differ(vit):
    """The variants are different functions (so the tests above could catch a swap)."""
    block = vit.visual.transformer.resblocks[-1]
    x = torch.randn(1, 17, 64, dtype=torch.float64)
    outs = [run_last_block(open_clip_parts(block), x, VARIANTS[v], (4, 4), 1) for v in VARIANTS]
    for i in range(len(outs)):
        for j in range(i):
            assert (outs[i] - outs[j]).norm() > 1e-3 * outs[j].norm()


# ---------------------------------------------------------------- dense features, retrievers


@pytest.mark.parametrize("variant", DENSE_ATTENTIONS)
@pytest.mark.parametrize("size", [64, 96])
@torch.no_grad()
def test_vit_cells_are_the_variant_block_then_ln_post_proj(vit, variant, size):
    """Invariant: ViT cells = the written-out variant on the real last block's input
    (captured from open_clip's forward at native size; positions interpolated at 96),
    then ln_post and proj on the patch tokens; the global embedding is unchanged."""
    visual = vit.visual
    pixels = torch.randn(2, 3, size, size, dtype=torch.float64)
    out = dense_features(visual, pixels, attention=variant)
    grid = (size // 16, size // 16)
    assert out.grid == grid
    if size == 64:
        x = last_block_input(visual.transformer.resblocks, visual, pixels)
        block = visual.transformer.resblocks[-1]
        ref = reference_block(
            variant, open_clip_weights(block), block.ln_1, block.ln_2, block.mlp, x, grid, 1
        )
        exact(out.dense, visual.ln_post(ref[:, 1:]) @ visual.proj)
        exact(out.global_embedding, vit.encode_image(pixels))


@pytest.mark.parametrize("backbone", ["ViT-tiny", "ViT-tiny-MAP"])
@pytest.mark.parametrize("variant", DENSE_ATTENTIONS)
def test_cluster_clip_clusters_each_variants_cells(backbone, variant):
    """Invariant: Cluster-CLIP on any ViT and variant = its aggregator on Dense-CLIP's
    cells of the same variant; the variant reaches both fingerprints when not default."""
    options = {
        "backbone": backbone,
        "pretrained": None,
        "resolution": 96,
        "dense_attention": variant,
    }
    torch.manual_seed(0)
    dense = create_retriever("dense_clip", **options)
    cluster = create_retriever("cluster_clip", aggregate={"method": "kmeans", "k": 3}, **options)
    cluster.model.load_state_dict(dense.model.state_dict())
    pixels = torch.randn(2, 3, 96, 96)
    out = dense.encode_dense(pixels)
    expected = cluster.aggregator(out.embeddings, out.mask, out.grid, out.boxes)
    reps = cluster.encode_images(pixels)
    torch.testing.assert_close(reps.embeddings, expected.embeddings)
    assert out.grid == (6, 6)
    assert reps.counts.max() <= 3
    for retriever in (dense, cluster):
        assert retriever.describe().get("dense_attention") == (
            None if variant == "maskclip" else variant
        )


def test_dense_attention_is_a_literal_config_key():
    """Invariant: ``retriever.dense_attention`` is a key of both retrievers, its allowed
    values are checked before any model loads, and a ResNet refuses the ViT variants."""
    for name in ("dense_clip", "cluster_clip"):
        assert RETRIEVERS.parameters(name)["dense_attention"].default == "maskclip"
    cfg = load_config("scenes_vit_dense_clip_naclip")
    assert cfg.retriever.dense_attention == "naclip"
    with pytest.raises(ConfigError, match="clearclip"):
        load_config("scenes_vit_dense_clip_naclip", ["retriever.dense_attention=clear"])
    with pytest.raises(ConfigError, match="dense_attention"):
        create_retriever("dense_clip", backbone="RN-tiny", pretrained=None, dense_attention="sclip")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_validates(name):
    """Invariant: every shipped experiment config composes and validates (keys and
    types from the retrievers' signatures), the rows that cannot run offline too."""
    cfg = load_config(name)
    assert cfg.retriever.name in RETRIEVERS.names()
    assert Path(CONFIG_DIR / "experiment" / f"{name}.yaml").is_file()


def test_shipped_vit_scenes_weights_load_strictly():
    """The ViT rows' model: a few MB, loaded into ViT-scenes by its bundled name
    (``retriever.pretrained=scenes-vit``, every key matched), recording its recipe; the
    RN name refuses the ViT backbone, naming the right one."""
    from safetensors import safe_open

    from retrieval.retrievers.openclip_loader import BUNDLED, load_open_clip

    model, path = BUNDLED["scenes-vit"]
    assert model == "ViT-scenes"
    assert path.is_file()
    assert path.stat().st_size < 12 * 2**20
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["recipe"])["model"] == "ViT-scenes"
    loaded = load_open_clip("ViT-scenes", "scenes-vit")
    assert not loaded.random_weights
    assert loaded.weights == str(path)
    with pytest.raises(ConfigError, match="pretrained=scenes-vit"):
        load_open_clip("ViT-scenes", "scenes")

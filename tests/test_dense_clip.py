"""Dense-CLIP against open_clip's own forward: the identities that make a cell embedding CLIP's.

Random weights, tiny towers (RN-tiny, ViT-tiny, a custom ModifiedResNet), float64 where an
identity is checked to rounding error; one real-size RN50 forward and an RN50x64 shape
check on the meta device.
"""

from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from open_clip.model import resize_pos_embed
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torch import Tensor, nn

from retrieval import create_retriever
from retrieval.config import load_config
from retrieval.registry import RETRIEVERS
from retrieval.retrievers.dense_clip import DenseClipRetriever, default_resolution
from retrieval.retrievers.dense_features import (
    dense_features,
    interpolate_positions,
    resnet_dense_features,
    resnet_feature_map,
    vit_dense_features,
)

os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.filterwarnings("ignore:retriever.pretrained=null")

ROWS = [
    f"{kind}_{size}"
    for kind in ("dense_clip", "clip_dense_clip")
    for size in ("rn50", "rn50x4", "rn50x64")
]


def exact(actual: Tensor, expected: Tensor) -> None:
    """Equal to float64 rounding, relative to the vectors' scale."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10 * expected.abs().max().item())


def open_clip_resized(table: Tensor, grid: tuple[int, int]) -> Tensor:
    """open_clip's own positional resize (what loading a checkpoint at another size does)."""
    state = {"visual.positional_embedding": table}
    resize_pos_embed(state, SimpleNamespace(visual=SimpleNamespace(grid_size=grid)))
    return state["visual.positional_embedding"]


def random_image(height: int = 50, width: int = 80, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def resnet() -> ModifiedResNet:
    """A 64-px ModifiedResNet, 8 heads, with peaked attention (so head-averaging shows)."""
    torch.manual_seed(0)
    visual = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=24, heads=8, image_size=64, width=8)
    with torch.no_grad():
        visual.attnpool.q_proj.weight.mul_(8)
    return visual.double().eval()


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model("ViT-tiny").double().eval()


def pool_input(pool: AttentionPool2d, features: Tensor, table: Tensor) -> Tensor:
    """The pool's tokens as ``AttentionPool2d.forward`` builds them, batch first."""
    x = features.flatten(2).transpose(1, 2)
    return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + table


def per_head_sum(pool: AttentionPool2d, tokens: Tensor) -> Tensor:
    """``c_proj.bias + sum_h sum_l a[h, l] W_c[:, head h] @ v_l[head h]``, head by head."""
    head_dim = tokens.shape[-1] // pool.num_heads
    q, k, v = pool.q_proj(tokens[:, 0]), pool.k_proj(tokens), pool.v_proj(tokens)
    out = pool.c_proj.bias.expand(tokens.shape[0], -1).clone()
    for h in range(pool.num_heads):
        s = slice(h * head_dim, (h + 1) * head_dim)
        a = torch.einsum("bld,bd->bl", k[:, :, s], q[:, s]).div(math.sqrt(head_dim)).softmax(-1)
        out += torch.einsum("bl,ble,de->bd", a, v[:, :, s], pool.c_proj.weight[:, s])
    return out


@pytest.mark.parametrize("size", [64, 128])
@torch.no_grad()
def test_resnet_pool_output_is_per_head_sum_of_dense_values(resnet, size):
    """Invariant: with positions, open_clip's ``attnpool(x)`` equals c_proj.bias + the per-head
    attention-weighted sum, over the mean token and every location, of the value vectors
    through c_proj's head slice; at native size (64) and enlarged (128, positions resized as
    open_clip resizes them). ``resnet_dense_features`` returns that output as its global
    embedding and ``c_proj(v_proj(x_l + pos_l))`` as its positional cells."""
    pool = resnet.attnpool
    pixels = torch.randn(2, 3, size, size, dtype=torch.float64)
    features = resnet_feature_map(resnet, pixels)
    grid = tuple(features.shape[-2:])
    reference_pool = copy.deepcopy(pool)
    reference_pool.positional_embedding = nn.Parameter(
        open_clip_resized(pool.positional_embedding, grid)
    )
    reference = reference_pool(features)
    tokens = pool_input(pool, features, reference_pool.positional_embedding)

    exact(per_head_sum(pool, tokens), reference)
    out = resnet_dense_features(resnet, pixels, positional=True)
    exact(out.global_embedding, reference)
    exact(out.dense, pool.c_proj(pool.v_proj(tokens[:, 1:])))
    if size == 64:
        exact(out.global_embedding, resnet(pixels))


@torch.no_grad()
def test_head_averaged_attention_is_not_the_pool_output(resnet):
    """Invariant: averaging the attention over heads before mixing the dense cells
    misses the pool's output by far more than rounding once attention is peaked (varied
    random feature maps here), so the per-head identity above is a real check."""
    pool = resnet.attnpool
    features = torch.randn(2, pool.k_proj.in_features, 2, 2, dtype=torch.float64)
    tokens = pool_input(pool, features, pool.positional_embedding)
    head_dim = tokens.shape[-1] // pool.num_heads
    q = pool.q_proj(tokens[:, 0]).view(2, pool.num_heads, head_dim)
    k = pool.k_proj(tokens).view(2, -1, pool.num_heads, head_dim)
    a = torch.einsum("bhd,blhd->bhl", q, k).div(math.sqrt(head_dim)).softmax(-1).mean(1)
    averaged = torch.einsum("bl,bld->bd", a, pool.c_proj(pool.v_proj(tokens)))
    reference = pool(features)
    assert (averaged - reference).norm() > 0.1 * reference.norm()


@torch.no_grad()
def test_resnet_cells_are_value_path_in_raster_order(resnet):
    """Invariant: without positions (MaskCLIP), cell ``i * w + j`` is
    ``c_proj(v_proj(x[:, :, i, j]))``; a non-square 2 x 3 grid catches swapped axes."""
    pixels = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    out = resnet_dense_features(resnet, pixels)
    features = resnet_feature_map(resnet, pixels)
    pool = resnet.attnpool
    assert out.grid == (2, 3)
    for i in range(2):
        for j in range(3):
            exact(out.dense[:, i * 3 + j], pool.c_proj(pool.v_proj(features[:, :, i, j])))


@torch.no_grad()
@pytest.mark.parametrize("positional", [False, True])
def test_skipping_the_global_leaves_the_cells_exact(resnet, vit, positional):
    """Invariant: ``with_global=False`` (Dense-CLIP without "CLIP + X") returns no global
    embedding and bit-identical cells, on a ResNet (with and without positions) and a ViT;
    a retriever without ``with_global`` asks for none."""
    pixels = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    both = resnet_dense_features(resnet, pixels, positional)
    cells = resnet_dense_features(resnet, pixels, positional, with_global=False)
    assert cells.global_embedding is None
    assert both.global_embedding is not None
    assert torch.equal(cells.dense, both.dense)
    assert cells.grid == both.grid
    if not positional:
        vit_pixels = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        full = dense_features(vit.visual, vit_pixels)
        only = dense_features(vit.visual, vit_pixels, with_global=False)
        assert only.global_embedding is None
        assert torch.equal(only.dense, full.dense)


def test_positions_interpolate_like_open_clip():
    """Invariant: the resized table is open_clip's ``resize_pos_embed`` (bicubic, token 0
    kept), up and down, on square and non-square grids; the native grid is untouched."""
    table = torch.randn(1 + 4 * 4, 8, dtype=torch.float64)
    for size in [(7, 7), (3, 5), (2, 2)]:
        resized = interpolate_positions(table, (4, 4), size)
        exact(resized, open_clip_resized(table, size))
        assert torch.equal(resized[0], table[0])
    assert interpolate_positions(table, (4, 4), (4, 4)) is table


def last_block_input(visual: nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """The last block's input during open_clip's own forward, and that forward's output."""
    captured = []
    block = visual.transformer.resblocks[-1]
    hook = block.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        pooled = visual(pixels)
    finally:
        hook.remove()
    return captured[0], pooled


@pytest.mark.parametrize("size", [64, 128])
@torch.no_grad()
def test_vit_value_path_is_last_block_with_self_only_attention(vit, size):
    """Invariant: ViT cells = open_clip's real last block run with each token attending only
    to itself (so attention = out_proj(v_proj(ln_1 x))), then ln_post and proj, on patch
    tokens; and the class-token path through our code is open_clip's ``encode_image``, at
    native size and at 128 (positions resized as open_clip resizes them)."""
    visual = copy.deepcopy(vit.visual)
    grid = (size // 16, size // 16)
    visual.positional_embedding = nn.Parameter(open_clip_resized(visual.positional_embedding, grid))
    pixels = torch.randn(2, 3, size, size, dtype=torch.float64)
    x, reference_global = last_block_input(visual, pixels)
    length = x.shape[1]
    self_only = torch.full((length, length), -math.inf, dtype=x.dtype).fill_diagonal_(0.0)
    y = visual.transformer.resblocks[-1](x, attn_mask=self_only)
    reference_cells = visual.ln_post(y[:, 1:]) @ visual.proj

    out = vit_dense_features(vit.visual, pixels)
    assert out.grid == grid
    exact(out.dense, reference_cells)
    exact(out.global_embedding, reference_global)
    if size == 64:
        exact(out.global_embedding, vit.encode_image(pixels))


@pytest.mark.parametrize("backbone", ["RN-tiny", "ViT-tiny"])
def test_same_pass_global_at_native_is_encode_image(backbone):
    """Invariant: with ``global_pass='same'`` at native size the appended representative is
    open_clip's normalised ``encode_image`` (ResNet pool output / ViT class token)."""
    retriever = create_retriever("dense_clip", backbone=backbone, pretrained=None, with_global=True)
    assert retriever.resolution == 64
    pixels = torch.randn(2, 3, 64, 64)
    reps = retriever.encode_images(pixels)
    with torch.no_grad():
        expected = F.normalize(retriever.model.encode_image(pixels), dim=-1)
    assert reps.embeddings.shape == (2, 4 + 1 if backbone == "RN-tiny" else 16 + 1, 64)
    torch.testing.assert_close(reps.embeddings[:, -1], expected, rtol=0, atol=1e-5)


def test_rn50_at_512_gives_256_cells_plus_global():
    """Invariant: RN50's default input is 512 -> 16 x 16 = 256 cells, 257 with the global
    one (real architecture, real code path, one image); boxes: the cells, then the whole
    image."""
    retriever = create_retriever("dense_clip", backbone="RN50", pretrained=None, with_global=True)
    assert retriever.resolution == 512
    pixels = retriever.image_transform(random_image())
    assert pixels.shape == (3, 512, 512)
    reps = retriever.encode_images(pixels[None])
    assert reps.embeddings.shape == (1, 257, 1024)
    assert reps.counts.tolist() == [257]
    assert reps.boxes[0, -1].tolist() == [0.0, 0.0, 1.0, 1.0]
    torch.testing.assert_close(reps.embeddings.norm(dim=-1), torch.ones(1, 257))


def test_rn50x64_at_448_gives_196_cells():
    """Invariant: RN50x64's default input is 448 -> 14 x 14 = 196 cells (+1 global = 197);
    the real architecture on the meta device (shapes only: a real build takes ~7 s)."""
    with torch.device("meta"):
        model = open_clip.create_model("RN50x64", pretrained=None, device="meta")
    assert default_resolution("RN50x64-quickgelu", model.visual) == 448
    out = resnet_dense_features(model.visual, torch.empty(1, 3, 448, 448, device="meta"))
    assert out.grid == (14, 14)
    assert out.dense.shape == (1, 196, 1024)
    assert out.global_embedding.shape == (1, 1024)


def test_boxes_tile_the_image_in_raster_order():
    """Invariant: the cells' boxes tile the unit square (union = square, pairwise overlap
    zero, areas sum to 1) and box ``k`` is grid cell ``(k // w, k % w)``, on 2 x 2, 3 x 3
    and 5 x 5 grids."""
    retriever = create_retriever("dense_clip", backbone="RN-tiny", pretrained=None)
    for resolution in (64, 96, 160):
        out = retriever.encode_dense(torch.randn(1, 3, resolution, resolution))
        h, w = out.grid
        assert (h, w) == (resolution // 32, resolution // 32)
        boxes = out.boxes.double()
        assert boxes.shape == (h * w, 4)
        assert boxes[:, :2].min() == 0
        assert boxes[:, 2:].max() == 1
        lo = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
        hi = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
        assert (hi - lo).clamp(min=0).prod(-1).fill_diagonal_(0).max() == 0
        assert math.isclose((boxes[:, 2:] - boxes[:, :2]).prod(-1).sum().item(), 1.0)
        k = torch.arange(h * w, dtype=torch.float64)
        torch.testing.assert_close(boxes[:, :2], torch.stack([(k % w) / w, (k // w) / h], 1))


def test_create_retriever_round_trip_with_every_keyword(tmp_path):
    """Invariant: every keyword reaches the retriever and its ``describe()``; the native
    global pass gives ``[2, 3, S, S]`` views: view 0 is the image squashed to S x S (no
    crop), and the global representative is open_clip's ``encode_image`` on its own
    resize + centre-crop preprocessing (the ``clip`` retriever's) of the same image; the
    cells are the positional value path of view 0."""
    kwargs = {
        "backbone": "RN-tiny",
        "pretrained": None,
        "resolution": 96,
        "cache_dir": str(tmp_path),
        "positional": True,
        "with_global": True,
        "global_pass": "native",
        "dense_attention": "maskclip",
    }
    assert set(kwargs) == set(RETRIEVERS.parameters("dense_clip"))
    retriever = create_retriever("dense_clip", **kwargs)
    assert isinstance(retriever, DenseClipRetriever)
    described = retriever.describe()
    for key in ("pretrained", "resolution", "positional", "with_global", "global_pass"):
        assert described[key] == kwargs[key]
    image = random_image()
    pixels = retriever.image_transform(image)[None]
    assert pixels.shape == (1, 2, 3, 96, 96)
    cfg = retriever.model.visual.preprocess_cfg
    squash = T.Compose(
        [
            T.Resize((96, 96), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
    torch.testing.assert_close(pixels[0, 0], squash(image))
    reps = retriever.encode_images(pixels)
    assert reps.embeddings.shape == (1, 3 * 3 + 1, 64)
    native = image_transform_v2(PreprocessCfg(**cfg), is_train=False)(image)[None]
    with torch.no_grad():
        expected_global = F.normalize(retriever.model.encode_image(native), dim=-1)
        cells = resnet_dense_features(retriever.model.visual, pixels[:, 0], positional=True)
    torch.testing.assert_close(reps.embeddings[:, -1], expected_global, rtol=0, atol=1e-5)
    torch.testing.assert_close(reps.embeddings[:, :-1], F.normalize(cells.dense, dim=-1))


@pytest.mark.parametrize("row", ROWS)
def test_paper_row_configs_build_the_retriever_options(row):
    """Invariant: each paper-row experiment config validates, and its ``retriever`` section
    is exactly keyword arguments of ``dense_clip`` with the row's size and global flag."""
    cfg = load_config(f"{row}_coco")
    options = {k: v for k, v in cfg.retriever.items() if k != "name"}
    assert cfg.retriever.name == "dense_clip"
    assert set(options) <= set(RETRIEVERS.parameters("dense_clip"))
    assert options["resolution"] == (448 if row.endswith("x64") else 512)
    assert options["with_global"] == row.startswith("clip_")
    assert cfg.run.output_dir == f"runs/{row}_coco"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "RN-tiny", "global_pass": "twice"}, "global_pass"),
        ({"backbone": "ViT-tiny", "positional": True}, "positional"),
    ],
)
def test_bad_options_name_the_key(kwargs, message):
    """Invariant: a wrong option fails at construction with the option's name in the message."""
    with pytest.raises(ValueError, match=message):
        create_retriever("dense_clip", pretrained=None, **kwargs)


def test_native_pass_rejects_single_view_pixels():
    """Invariant: ``global_pass='native'`` refuses pixels that are not its two-view batches,
    rather than silently using the dense view for the global embedding."""
    retriever = create_retriever(
        "dense_clip", backbone="RN-tiny", pretrained=None, with_global=True, global_pass="native"
    )
    with pytest.raises(ValueError, match="two-view"):
        retriever.encode_images(torch.randn(1, 3, 64, 64))

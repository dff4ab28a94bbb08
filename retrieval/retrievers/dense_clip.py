"""Dense-CLIP and CLIP + Dense-CLIP: one CLIP embedding per feature-map cell.

An object that fills a small part of the image barely moves the global embedding; a
cell's own embedding still matches its name. The per-cell embeddings come from the last
attention layer's value path (MaskCLIP, see ``dense_features``); the image scores a
query by its best cell.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torch import Tensor

from retrieval.aggregate import grid_cell_boxes
from retrieval.errors import ConfigError
from retrieval.representatives import Representatives
from retrieval.retrievers.base import register_retriever
from retrieval.retrievers.clip import FULL_IMAGE_BOX, OpenClipRetriever, check_source
from retrieval.retrievers.dense_features import (
    Grid,
    check_supported,
    dense_features,
    is_resnet,
)
from retrieval.retrievers.vit_attention import DenseAttention

if TYPE_CHECKING:
    from retrieval.retrievers.openclip_loader import ClipModel, ClipVisual

ImageTransform = Callable[[Image.Image], Tensor]

# The paper's inputs: 512 gives RN50 / RN50x4 a 16 x 16 grid, 448 gives RN50x64 14 x 14.
DEFAULT_RESOLUTION = {"RN50": 512, "RN50x4": 512, "RN50x64": 448}
GLOBAL_PASSES = ("same", "native")


# What fixes the Dense-CLIP features a run may take from stored shards (store.dense_from).
DENSE_FEATURE_KEYS = ("model", "pretrained", "resolution", "positional", "dense_attention")
GLOBAL_KEYS = ("with_global", "global_pass")


class DenseOutput(NamedTuple):
    """Dense embeddings before any aggregation (what Cluster-CLIP clusters).

    Attributes:
        embeddings: ``[B, N, D]`` L2-normalised cell embeddings, raster order.
        mask: ``[B, N]`` bool, all True (every cell is valid).
        grid: ``(h, w)`` with ``N = h * w``.
        boxes: ``[N, 4]`` normalised ``xyxy`` cell of each embedding (same for every image).
        global_embedding: ``[B, D]`` L2-normalised image embedding, or None without
            ``with_global``.
    """

    embeddings: Tensor
    mask: Tensor
    grid: Grid
    boxes: Tensor
    global_embedding: Tensor | None


def native_size(visual: ClipVisual) -> int:
    """The tower's native input side (224 for RN50, 448 for RN50x64)."""
    size = visual.image_size
    return size if isinstance(size, int) else size[0]


def default_resolution(model_name: str, visual: ClipVisual) -> int:
    """The paper's input for RN50 / RN50x4 / RN50x64, the native size for any other model."""
    return DEFAULT_RESOLUTION.get(model_name.removesuffix("-quickgelu"), native_size(visual))


def square_transform(model: ClipModel, size: int) -> ImageTransform:
    """PIL -> ``[3, size, size]``: squash to a square (no crop, nothing at the border is
    lost), with the backbone's interpolation and mean / std."""
    cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    return image_transform_v2(dataclasses.replace(cfg, size=size, resize_mode="squash"), False)


class TwoViewTransform:
    """PIL -> ``[2, 3, S, S]``: the square dense view and the native resize + centre-crop view.

    Each view sits top-left in an ``S x S`` canvas (``S`` = the larger side) so a batch
    collates into one tensor; :meth:`DenseClipRetriever.split_views` cuts them out again.
    """

    def __init__(self, dense: ImageTransform, native: ImageTransform, size: int) -> None:
        self.dense = dense
        self.native = native
        self.size = size

    def __call__(self, image: Image.Image) -> Tensor:
        views = [self.dense(image), self.native(image)]
        out = views[0].new_zeros(2, 3, self.size, self.size)
        for i, view in enumerate(views):
            out[i, :, : view.shape[1], : view.shape[2]] = view
        return out


@register_retriever("dense_clip")
class DenseClipRetriever(OpenClipRetriever):
    """Dense-CLIP: ``h x w`` cell embeddings per image (+ the global one: CLIP + Dense-CLIP).

    ResNets (RN50, RN50x4, RN50x64, any ModifiedResNet): a cell's embedding is
    ``c_proj(v_proj(x_l))`` of the attention pool, MaskCLIP's formulation. The pool's
    output is ``c_proj.bias`` + the sum over heads and tokens of attention x
    ``c_proj``-slice x ``v_proj(x_l + pos_l)``-slice, so with ``positional`` a cell is
    exactly what the pool would output if it attended to that cell alone; MaskCLIP drops
    ``pos_l``, which says where a cell is, not what it shows.

    ViTs (ViT-B/32, B/16, L/14): the last block's attention is replaced by each patch's
    own value (``out_proj(v_proj(ln_1(x)))``), then the block's residual and MLP,
    ``ln_post`` and ``proj``, as MaskCLIP does. Only the query-key mixing (which pulls
    every token towards image-level content) is removed; every map after it is the one
    the class token takes into the joint space. ``dense_attention`` swaps in SCLIP,
    ClearCLIP or NACLIP's last block instead (``vit_attention``, docs/dense_attention.md).

    SigLIP / SigLIP2 (timm ViTs with a MAP attention-pool head): a patch's embedding is
    the MAP head's output had it attended to that patch alone (its value path, then its
    MLP residual; ``siglip_features``), after the trunk's last block (as trained for
    ``maskclip``, rewritten for the other variants).

    Preprocessing: squash to ``resolution x resolution`` (no crop), the backbone's
    interpolation and mean / std. Grid = resolution / 32 (ResNet) or / patch (ViT).

    Args:
        backbone: open_clip model name; ``openai`` weights switch to ``-quickgelu``.
        pretrained: a tag (``openai``), a checkpoint path, or None (random weights,
            pipeline checks only).
        resolution: square input side. None: 512 for RN50 and RN50x4 (16 x 16 = 256
            cells), 448 for RN50x64 (14 x 14 = 196), the native size for any other model
            (ViT-B/16: 224 -> 196 cells).
        cache_dir: where tags are cached (default: the Hugging Face cache).
        positional: ResNets only: add the interpolated positional embedding before
            ``v_proj`` (``x_l + pos_l``). False follows MaskCLIP.
        with_global: append the image's global CLIP embedding (box = whole image).
        global_pass: ``same``: the global embedding from the dense pass itself (the
            ResNet pool's real output, or the ViT class token, with positions
            interpolated to the enlarged grid); no extra cost, but the tower sees a
            squashed image at a size it was not trained at. ``native``: a second pass at
            the native size with the ``clip`` retriever's resize + centre crop, so it is
            exactly the global CLIP embedding (docs/protocol.md, "CLIP + X"); ``image_transform``
            then returns both views, ``[2, 3, S, S]``.
        dense_attention: ViTs only: the last block for the patches. ``maskclip`` (each
            token's own value; residual and FFN kept), ``sclip`` (``softmax(q q^T) +
            softmax(k k^T)``; residual and FFN kept), ``clearclip`` (``softmax(q q^T)``;
            no residual, no FFN), ``naclip`` (``softmax(k k^T + Gaussian over the grid)``;
            no residual, no FFN). ResNets take ``maskclip`` only.
    """

    def __init__(
        self,
        backbone: str = "RN50",
        pretrained: str | None = "openai",
        resolution: int | None = None,
        cache_dir: str | None = None,
        positional: bool = False,
        with_global: bool = False,
        global_pass: str = "same",
        dense_attention: DenseAttention = "maskclip",
    ) -> None:
        if global_pass not in GLOBAL_PASSES:
            raise ConfigError(
                f"retriever.global_pass={global_pass!r} must be one of {', '.join(GLOBAL_PASSES)}"
            )
        super().__init__(backbone, pretrained, None, cache_dir)
        visual = self.model.visual
        check_supported(visual, dense_attention)
        if positional and not is_resnet(visual):
            raise ConfigError(
                f"retriever.positional=true applies to ResNet backbones only; {backbone} is a "
                f"ViT, which adds its positions at the input. Set retriever.positional=false."
            )
        self.resolution = resolution or default_resolution(self.model_name, visual)
        self.positional = positional
        self.with_global = with_global
        self.global_pass = global_pass
        self.dense_attention = dense_attention
        self.native_size = native_size(visual)
        dense_view = square_transform(self.model, self.resolution)
        self.image_transform = (
            TwoViewTransform(
                dense_view, self.image_transform, max(self.resolution, self.native_size)
            )
            if self.two_views
            else dense_view
        )
        self.config.update(
            resolution=self.resolution,
            positional=positional,
            with_global=with_global,
            global_pass=global_pass,
        )
        if dense_attention != "maskclip":
            # only when set: runs stored before the option existed stay reusable
            self.config["dense_attention"] = dense_attention

    @property
    def two_views(self) -> bool:
        """True when the global embedding needs its own native-size view of the image."""
        return self.with_global and self.global_pass == "native"

    def split_views(self, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
        """Dense ``[B, 3, S, S]`` and native ``[B, 3, n, n]`` (or None) views of a batch."""
        if not self.two_views:
            if pixels.ndim != 4:
                raise ValueError(f"expected pixels [B, 3, H, W], got {tuple(pixels.shape)}")
            return pixels, None
        if pixels.ndim != 5 or pixels.shape[1] != 2:
            raise ValueError(
                f"global_pass='native' expects this retriever's two-view batches "
                f"[B, 2, 3, S, S] (from its image_transform), got {tuple(pixels.shape)}"
            )
        res, nat = self.resolution, self.native_size
        return pixels[:, 0, :, :res, :res], pixels[:, 1, :, :nat, :nat]

    @torch.no_grad()
    def encode_dense(self, pixels: Tensor) -> DenseOutput:
        """Cell embeddings of a batch from :attr:`image_transform`, before aggregation."""
        dense_pixels, native_pixels = self.split_views(pixels)
        same_pass = self.with_global and native_pixels is None
        feats = dense_features(
            self.model.visual, dense_pixels, self.positional, same_pass, self.dense_attention
        )
        embeddings = F.normalize(feats.dense.float(), dim=-1)
        mask = torch.ones(embeddings.shape[:2], dtype=torch.bool, device=embeddings.device)
        boxes = grid_cell_boxes(feats.grid, embeddings.device)
        global_embedding = None
        if self.with_global:
            raw = feats.global_embedding
            if native_pixels is not None:
                raw = self.model.encode_image(native_pixels)
            assert raw is not None  # same_pass asked dense_features for it
            global_embedding = F.normalize(raw.float(), dim=-1)
        return DenseOutput(embeddings, mask, feats.grid, boxes, global_embedding)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Representatives:
        out = self.encode_dense(pixels)
        batch, cells, _ = out.embeddings.shape
        embeddings = out.embeddings
        boxes = out.boxes.expand(batch, cells, 4)
        if out.global_embedding is not None:
            embeddings = torch.cat([embeddings, out.global_embedding.unsqueeze(1)], dim=1)
            whole = boxes.new_tensor(FULL_IMAGE_BOX).expand(batch, 1, 4)
            boxes = torch.cat([boxes, whole], dim=1)
        return Representatives.dense(embeddings, boxes.contiguous())

    def check_dense_source(self, dense_config: dict[str, Any]) -> None:
        """Refuses stored Dense-CLIP embeddings made with other feature settings (or
        without the global embedding this retriever appends).

        Raises:
            ConfigError: naming each setting that differs (a missing global included).
        """
        keys = DENSE_FEATURE_KEYS + (GLOBAL_KEYS if self.with_global else ())
        check_source(dense_config, self.config, keys)

    def from_dense(self, stored: Representatives, dense_config: dict[str, Any]) -> Representatives:
        """A ``dense_clip`` run's stored representatives as this run's: the cells, bit for
        bit, without the global embedding the source appended when this run has none."""
        if self.with_global or not dense_config.get("with_global"):
            return stored
        cells = stored.embeddings.shape[1] - 1
        boxes = None if stored.boxes is None else stored.boxes[:, :cells]
        return Representatives(stored.embeddings[:, :cells], stored.mask[:, :cells], boxes)

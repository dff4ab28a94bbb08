"""Global CLIP: one embedding per image, the baseline every other retriever is measured by."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval.factory import register_retriever
from retrieval.representatives import Representatives
from retrieval.retrievers.base import Retriever
from retrieval.retrievers.openclip_loader import file_sha256, load_open_clip

FULL_IMAGE_BOX = (0.0, 0.0, 1.0, 1.0)


class OpenClipRetriever(Retriever):
    """Shared plumbing of retrievers on an open_clip model: loading, text, preprocessing."""

    def __init__(
        self,
        backbone: str = "RN50",
        pretrained: str | None = "openai",
        resolution: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        loaded = load_open_clip(backbone, pretrained, cache_dir, image_size=resolution)
        self.model = loaded.model
        self.model_name = loaded.model_name
        self.tokenizer = loaded.tokenizer
        self.image_transform = loaded.preprocess
        self.random_weights = loaded.random_weights
        self.embed_dim = loaded.embed_dim
        self.config: dict[str, Any] = {
            "backbone": backbone,
            "model": loaded.model_name,
            "pretrained": pretrained,
            "resolution": resolution,
            # retrained weights at the same path must not reuse stored embeddings
            "weights_sha256": file_sha256(loaded.weights),
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


@register_retriever("clip")
class ClipRetriever(OpenClipRetriever):
    """One global CLIP embedding per image (open_clip's own ``encode_image``).

    Preprocessing is the backbone's own: resize the shorter side and centre-crop at its
    native resolution (RN50 224, RN50x4 288, RN50x64 448). ``resolution`` forces another
    input size where open_clip supports it.

    Args:
        backbone: open_clip model name; ``openai`` weights switch to its ``-quickgelu``
            variant.
        pretrained: a tag (``openai``), a checkpoint path, or None (random weights,
            pipeline checks only).
        resolution: input size (None: native).
        cache_dir: where tags are cached (default: the Hugging Face cache).
    """

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Representatives:
        emb = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        boxes = emb.new_tensor(FULL_IMAGE_BOX).expand(emb.shape[0], 1, 4)
        return Representatives.dense(emb.unsqueeze(1), boxes.contiguous())

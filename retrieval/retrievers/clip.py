"""Global CLIP: one embedding per image, the baseline every other retriever is measured by."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval.errors import ConfigError, differences
from retrieval.representatives import Representatives
from retrieval.retrievers.base import Retriever, register_retriever
from retrieval.retrievers.openclip_loader import file_sha256, load_open_clip

log = logging.getLogger("retrieval")

FULL_IMAGE_BOX = (0.0, 0.0, 1.0, 1.0)
#: what a run deriving from stored Dense-CLIP embeddings (``store.dense_from``) must share
#: with the run that stored them: the model and its weights
GLOBAL_SOURCE_KEYS = ("model", "pretrained", "weights_sha256")


def check_source(stored: dict[str, Any], own: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuses stored Dense-CLIP embeddings whose settings ``keys`` differ from this
    retriever's.

    Raises:
        ConfigError: naming each setting that differs.
    """
    diff = differences({k: stored.get(k) for k in keys}, {k: own.get(k) for k in keys})
    if diff:
        raise ConfigError(
            "the stored Dense-CLIP embeddings were made with other settings: " + "; ".join(diff)
        )


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

    def describe(self) -> dict[str, Any]:
        """:attr:`config`: backbone, weights (and their hash), resolution."""
        return dict(self.config)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """``[Q, D]``; a text longer than the model's context (77 tokens for CLIP) is cut
        to it by the tokenizer, and a warning names it (its end is not read)."""
        tokens = self.tokenizer(texts)
        end = getattr(self.tokenizer, "eot_token_id", None)  # open_clip's BPE tokenizer
        full = (tokens[:, -1] == end).tolist() if end is not None else [False] * len(texts)
        for text in (t for t, cut in zip(texts, full, strict=True) if cut):
            log.warning(
                "query %r fills the model's %d-token context: words past it are not read",
                text if len(text) <= 80 else text[:77] + "...", tokens.shape[1],
            )  # fmt: skip
        return F.normalize(self.model.encode_text(tokens.to(self.device)).float(), dim=-1)


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

    def check_dense_source(self, dense_config: dict[str, Any]) -> None:
        """A global CLIP run at its native size can take the global embedding a
        ``dense_clip`` run kept with ``global_pass=native`` (the same model on the same
        resize + centre-crop view); anything else is refused, naming why."""
        if self.config.get("resolution") is not None:
            raise ConfigError("a clip run with retriever.resolution set has no stored twin")
        if not (dense_config.get("with_global") and dense_config.get("global_pass") == "native"):
            raise ConfigError("the Dense-CLIP run kept no native-size global embedding")
        check_source(dense_config, self.config, GLOBAL_SOURCE_KEYS)

    def from_dense(self, stored: Representatives, dense_config: dict[str, Any]) -> Representatives:
        """The global embedding such a run stored after its cells (whole-image box)."""
        boxes = None if stored.boxes is None else stored.boxes[:, -1:]
        return Representatives(stored.embeddings[:, -1:], stored.mask[:, -1:], boxes)

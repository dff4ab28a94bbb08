"""Query embeddings: category names put into prompt templates, averaged (CLIP's ensemble)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor

from retrieval.errors import ConfigError

SINGLE_TEMPLATE = "a photo of a {}."


def templates(prompts: str) -> list[str]:
    """Template strings of a prompt set: ``imagenet80`` (CLIP paper) or ``single``."""
    if prompts == "imagenet80":
        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    if prompts == "single":
        return [SINGLE_TEMPLATE]
    raise ConfigError(f"text.prompts={prompts!r} is not one of imagenet80, single")


@torch.no_grad()
def embed_queries(
    encode_text: Callable[[list[str]], Tensor],
    queries: list[str],
    prompts: str = "imagenet80",
    batch_size: int = 256,
) -> Tensor:
    """``[Q, D]`` query embeddings: per query, the mean of its L2-normalised template
    embeddings, normalised again (docs/protocol.md, "Prompt ensemble").

    Args:
        encode_text: a retriever's ``encode_text`` (returns normalised ``[n, D]``).
        queries: cleaned category names.
        prompts: the template set.
        batch_size: texts encoded per call.
    """
    temps = templates(prompts)
    texts = [t.format(q) for q in queries for t in temps]
    parts = [encode_text(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    emb = F.normalize(torch.cat(parts).float(), dim=-1)
    emb = emb.view(len(queries), len(temps), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)

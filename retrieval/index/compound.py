"""Compound text queries, one implementation for the CLI, Python and the HTTP API.

A query such as ``"a red circle -a red ring"`` names texts to find (``positive``) and
texts to push away (``negative``). Its query vector ``q``, a unit vector searched like a
plain text embedding, is

    p = normalise(Σ_i w_i t_i),   n = normalise(Σ_j n_j),   q = normalise(p - λ n)

with ``t_i`` the positive texts' embeddings (weights ``w_i``, default 1), ``n_j`` the
negative ones' and ``λ`` the negative weight (default 0.5); without negatives ``q = p``.

:func:`parse_compound` reads the page's text syntax (``retrieval/serve/static/app.js``,
``parseQuery``): a phrase starts at a word beginning with ``+`` or ``-`` (or at a lone
``+`` / ``-``); a hyphen inside a word (``t-shirt``) is part of the word; text with no
sign, or one positive phrase alone, is a plain query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from retrieval.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

DEFAULT_NEGATIVE_WEIGHT = 0.5
TINY = 1e-6  # a combined vector shorter than this has cancelled out


@dataclass(frozen=True)
class CompoundText:
    """A parsed query: its positive and negative phrases."""

    positive: list[str]
    negative: list[str]

    @property
    def compound(self) -> bool:
        """More than one plain text: a negative phrase, or several positive ones."""
        return bool(self.negative) or len(self.positive) > 1


def parse_compound(text: str) -> CompoundText:
    """``"a stroller -a bicycle"`` -> positive ``["a stroller"]``, negative ``["a bicycle"]``
    (the module docstring has the rule); plain text is one positive phrase."""
    positive: list[str] = []
    negative: list[str] = []
    sign, marked = "+", False
    words: list[str] = []

    def flush() -> None:
        if words:
            (negative if sign == "-" else positive).append(" ".join(words))
            words.clear()

    for word in text.split():
        if word in ("+", "-"):
            flush()
            sign, marked = word, True
        elif word[0] in "+-":
            flush()
            sign, marked = word[0], True
            if word[1:]:
                words.append(word[1:])
        else:
            words.append(word)
    flush()
    if not marked:
        return CompoundText([text.strip()] if text.strip() else [], [])
    if not positive:
        raise ConfigError(
            f"query {text!r} has no phrase to find, only ones to push away: give one first, "
            f'e.g. "a stroller -a bicycle"'
        )
    return CompoundText(positive, negative)


def compound_vector(
    embeddings: Tensor,
    positives: int,
    weights: list[float] | None = None,
    negative_weight: float | None = None,
) -> Tensor:
    """The query vector ``[D]`` of texts embedded as ``embeddings [T, D]``: the first
    ``positives`` rows positive, the rest negative (module docstring for the formula).

    Raises:
        ConfigError: the weighted positives, or positives and negatives, cancel out.
    """
    import torch
    import torch.nn.functional as F

    w = torch.tensor(weights if weights is not None else [1.0] * positives)
    lam = DEFAULT_NEGATIVE_WEIGHT if negative_weight is None else negative_weight
    pos = (w[:, None] * embeddings[:positives].float()).sum(dim=0)
    if pos.norm() < TINY:
        raise ConfigError("the weighted positive texts cancel out: change their weights")
    q = F.normalize(pos, dim=0)
    if len(embeddings) > positives:
        neg = embeddings[positives:].float().sum(dim=0)
        q = q - lam * F.normalize(neg, dim=0)
        if q.norm() < TINY:
            raise ConfigError(
                "the negative texts cancel the positive ones out: lower negative_weight"
            )
    return F.normalize(q, dim=0)

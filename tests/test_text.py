"""Prompt ensembles follow docs/protocol.md: the mean of normalised template embeddings,
renormalised."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retrieval.text import embed_queries, templates


def _fake_encoder(texts: list[str]) -> torch.Tensor:
    g = [torch.Generator().manual_seed(sum(map(ord, t))) for t in texts]
    return F.normalize(torch.stack([torch.randn(8, generator=x) for x in g]), dim=-1)


def test_imagenet80_templates() -> None:
    """The default set is CLIP's 80 ImageNet templates; single is 'a photo of a {}.'."""
    temps = templates("imagenet80")
    assert len(temps) == 80
    assert len(set(temps)) == 80
    assert "a photo of a {}." in temps
    assert all("{}" in t for t in temps)
    assert templates("single") == ["a photo of a {}."]


def test_ensemble_is_normalised_mean_of_templates() -> None:
    """embed_queries == normalise(mean_t normalise(encode(t.format(q)))) per query,
    whatever the encoding batch size."""
    queries = ["fire hydrant", "stroller", "bow"]
    got = embed_queries(_fake_encoder, queries, "imagenet80", batch_size=7)
    for i, q in enumerate(queries):
        per_template = _fake_encoder([t.format(q) for t in templates("imagenet80")])
        expected = F.normalize(per_template.mean(0), dim=0)
        torch.testing.assert_close(got[i], expected)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))

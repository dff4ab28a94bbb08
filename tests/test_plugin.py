"""A separately installed package adds a retriever through the entry-point group."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from retrieval import registry
from retrieval.config import ConfigError, load_config

PLUGIN = '''
import torch
import torch.nn.functional as F
from retrieval import Representatives, Retriever


class ColourRetriever(Retriever):
    """Embeds an image as its mean colour; text as a fixed vector per word length."""

    def __init__(self, dim: int = 3, scale: float = 1.0) -> None:
        super().__init__()
        self.embed_dim = dim
        self.scale = scale
        self.image_transform = lambda image: torch.zeros(3, 4, 4)

    def encode_images(self, pixels):
        emb = F.normalize(pixels.mean(dim=(2, 3)) * self.scale + 1e-6, dim=-1)
        return Representatives.dense(emb.unsqueeze(1))

    def encode_text(self, texts):
        return F.normalize(torch.ones(len(texts), self.embed_dim), dim=-1)
'''


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes a package + dist-info with an entry point, as pip would install it."""
    (tmp_path / "colour_plugin").mkdir()
    (tmp_path / "colour_plugin" / "__init__.py").write_text(PLUGIN)
    dist = tmp_path / "colour_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: colour-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[retrieval.retrievers]\ncolour = colour_plugin:ColourRetriever\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry.RETRIEVERS, "entry_points_loaded", False)
    monkeypatch.setattr(registry.RETRIEVERS, "factories", dict(registry.RETRIEVERS.factories))
    yield
    sys.modules.pop("colour_plugin", None)


def test_entry_point_retriever_is_listed_and_built(installed_plugin: None) -> None:
    """The plugin appears in list_retrievers and create_retriever builds it with options."""
    from retrieval import create_retriever, list_retrievers

    assert "colour" in list_retrievers()
    retriever = create_retriever("colour", dim=3, scale=2.0)
    reps = retriever.encode_images(torch.rand(2, 3, 4, 4))
    assert reps.embeddings.shape == (2, 1, 3)
    assert retriever.score(retriever.encode_text(["a"]), reps).shape == (1, 2)


def test_plugin_options_are_config_keys(installed_plugin: None, tmp_path: Path) -> None:
    """The plugin's keyword arguments become validated, typed retriever.* config keys."""
    path = tmp_path / "colour.yaml"
    path.write_text("defaults:\n  - dataset: synthetic\nretriever:\n  name: colour\n  scale: 0.5\n")
    cfg = load_config(path)
    assert cfg.retriever.scale == 0.5 and cfg.retriever.dim == 3
    with pytest.raises(ConfigError, match="Did you mean 'retriever.scale'"):
        load_config(path, ["retriever.scal=2"])
    with pytest.raises(ConfigError, match="retriever.dim"):
        load_config(path, ["retriever.dim=three"])

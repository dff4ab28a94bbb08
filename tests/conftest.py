"""Shared fixtures: everything generated locally, nothing fetched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 24-image COCO-format dataset (annotations.json, images/) with varied object sizes."""
    from retrieval.data.synthetic import make_synthetic_coco

    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), num_images=24, seed=3)


@pytest.fixture(scope="session")
def dense_run(synthetic_coco, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Dense-CLIP run (tiny random-weight backbone, 4 x 4 cells) made by `evaluate`."""
    from fake_runs import tiny_dense_run

    return tiny_dense_run(*synthetic_coco, tmp_path_factory.mktemp("dense_run"))


# the search service's session fixtures (a real uvicorn server over built indexes), here so
# that every test module shares one server instead of starting its own
from serve_server import serve_indexes, served_index  # noqa: E402, F401

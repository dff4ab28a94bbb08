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
    from retrieval.config import load_config
    from retrieval.engine import evaluate

    ann, images = synthetic_coco
    out = tmp_path_factory.mktemp("dense_run")
    cfg = load_config(
        "demo",
        [
            f"data.annotations={ann}",
            f"data.images={images}",
            f"run.output_dir={out}",
            "run.progress=false",
            "loader.num_workers=0",
            "logger.wandb.mode=disabled",
            "retriever=dense_clip_rn50",
            "retriever.backbone=RN-tiny",
            "retriever.pretrained=null",
            "retriever.resolution=128",
            "text.prompts=single",
        ],
    )
    evaluate(cfg)
    return out


# the search service's session fixtures (a real uvicorn server over built indexes), here so
# that every test module shares one server instead of starting its own
from serve_server import serve_indexes, served_index  # noqa: E402, F401

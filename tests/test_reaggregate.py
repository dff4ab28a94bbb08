"""Cluster-CLIP re-aggregated from a Dense-CLIP run's shards, without the backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.config import ConfigError, load_config
from retrieval.engine import evaluate
from retrieval.retrievers.dense_clip import DenseClipRetriever

DENSE = """
defaults:
  - dataset: synthetic
retriever:
  name: dense_clip
  backbone: RN-tiny
  pretrained: null
  resolution: 128
  with_global: true
"""
CLUSTER = (
    DENSE.replace("name: dense_clip", "name: cluster_clip")
    + """
  aggregate:
    method: kmeans
    k: 3
"""
)


def _cfg(tmp_path: Path, text: str, data, out: str, *extra: str):
    path = tmp_path / f"{out}.yaml"
    path.write_text(text)
    ann, images = data
    return load_config(
        path,
        [
            f"data.annotations={ann}",
            f"data.images={images}",
            f"run.output_dir={tmp_path / out}",
            "run.progress=false",
            "loader.num_workers=0",
            "store.dtype=float32",
            "logger.wandb.mode=disabled",
            *extra,
        ],
    )


def test_reaggregation_equals_embedding_from_pixels(synthetic_coco, tmp_path, monkeypatch):
    """store.dense_from=<dense_clip run> gives the same representatives (counts) and
    scores as running cluster_clip on the pixels, and never runs the backbone."""
    evaluate(_cfg(tmp_path, DENSE, synthetic_coco, "dense"))
    direct = evaluate(_cfg(tmp_path, CLUSTER, synthetic_coco, "direct"))

    def boom(*args, **kwargs):
        raise AssertionError("backbone ran during re-aggregation")

    monkeypatch.setattr(DenseClipRetriever, "encode_dense", boom)
    swept = evaluate(
        _cfg(tmp_path, CLUSTER, synthetic_coco, "swept", f"store.dense_from={tmp_path / 'dense'}")
    )
    assert swept.embedded == 24
    assert swept.metrics["reps_per_image"] == direct.metrics["reps_per_image"]
    a = np.load(tmp_path / "direct" / "scores.npz")["scores"]
    b = np.load(tmp_path / "swept" / "scores.npz")["scores"]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_incompatible_dense_source_is_refused(synthetic_coco, tmp_path):
    """A dense run with other feature settings, or a non-dense run, is refused by name."""
    evaluate(_cfg(tmp_path, DENSE, synthetic_coco, "dense"))
    with pytest.raises(ConfigError, match="resolution: stored 128, now 64"):
        evaluate(
            _cfg(
                tmp_path,
                CLUSTER,
                synthetic_coco,
                "other",
                f"store.dense_from={tmp_path / 'dense'}",
                "retriever.resolution=64",
            )
        )
    with pytest.raises(ConfigError, match="no dense_clip embeddings"):
        evaluate(
            _cfg(
                tmp_path,
                CLUSTER,
                synthetic_coco,
                "none",
                f"store.dense_from={tmp_path / 'nothing'}",
            )
        )


def test_what_cannot_come_from_stored_dense_features_is_named() -> None:
    """`store.dense_from` on a retriever that cannot take stored Dense-CLIP features, or
    from a source that lacks what it needs, is one ConfigError saying why."""
    from retrieval.engine.reaggregate import deriver
    from retrieval.retrievers.clip import ClipRetriever

    clip = ClipRetriever("RN-tiny", None)
    source = {**clip.config, "with_global": True, "global_pass": "native"}
    deriver(clip, source)  # the matching source is taken
    with pytest.raises(ConfigError, match="no native-size global embedding"):
        deriver(clip, {**source, "global_pass": "same"})
    with pytest.raises(ConfigError, match="model"):
        deriver(clip, {**source, "model": "RN50"})
    with pytest.raises(ConfigError, match="resolution set"):
        deriver(ClipRetriever("RN-tiny", None, resolution=96), source)
    dense = DenseClipRetriever("RN-tiny", None, resolution=128)
    with pytest.raises(ConfigError, match="resolution"):
        deriver(dense, {**dense.config, "resolution": 256})
    with pytest.raises(ConfigError, match="clip, dense_clip, cluster_clip"):
        deriver(object(), source)

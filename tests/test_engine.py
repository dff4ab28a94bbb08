"""End to end: config -> Lightning predict -> shards -> exact scores -> metrics -> run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from retrieval.cli import main
from retrieval.config import ConfigError, load_config
from retrieval.data.synthetic import make_synthetic_coco
from retrieval.engine import evaluate
from retrieval.retrievers.clip import ClipRetriever


@pytest.fixture(scope="module")
def bad_coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """16 good images plus 2 corrupt ones."""
    return make_synthetic_coco(tmp_path_factory.mktemp("bad"), num_images=16, seed=5, bad_images=2)


def _overrides(data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    ann, images = data
    return [
        f"data.annotations={ann}",
        f"data.images={images}",
        f"run.output_dir={out}",
        "run.progress=false",
        "loader.num_workers=0",
        *extra,
    ]


@pytest.mark.slow
def test_cli_subprocess_writes_the_run_folder(synthetic_coco, tmp_path: Path) -> None:
    """`retrieval eval` as users run it writes every promised file and key, and the
    scores in scores.npz reproduce metrics.json's per-category AP under scikit-learn."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "retrieval.cli",
        "eval",
        "demo",
        *_overrides(synthetic_coco, out, "retriever.pretrained=null"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RANDOM WEIGHTS" in done.stdout
    for name in ("config.yaml", "metrics.json", "per_category.csv", "scores.npz", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "map@50",
        "map",
        "map@50_s-m",
        "map@50_hits",
        "per_category",
        "protocol",
        "reps_per_image",
        "bytes_per_image",
    ):
        assert key in metrics, key
    assert metrics["random_weights"] is True
    assert metrics["reps_per_image"]["max"] == 1

    saved = np.load(out / "scores.npz")
    ann = json.loads(synthetic_coco[0].read_text())
    assert saved["scores"].shape == (len(ann["categories"]), len(ann["images"]))
    positives = {(a["category_id"], a["image_id"]) for a in ann["annotations"]}
    for q, cat in enumerate(saved["category_ids"]):
        y = np.array([(int(cat), int(i)) in positives for i in saved["image_ids"]])
        row = next(r for r in metrics["per_category"] if r["category_id"] == cat)
        if y.any():
            assert row["ap"] == pytest.approx(average_precision_score(y, saved["scores"][q]))
    wandb_runs = list((out / "wandb").glob("offline-run-*"))
    assert wandb_runs
    assert list(wandb_runs[0].glob("*.wandb"))


def test_bad_image_skip_lists_it_everywhere(bad_coco, tmp_path: Path) -> None:
    """Under data.on_bad_image=skip the corrupt files are left out of the ranking and
    listed in metrics.json, summary.md and skipped_images.txt."""
    cfg = load_config(
        "demo",
        _overrides(bad_coco, tmp_path, "data.on_bad_image=skip", "logger.wandb.mode=disabled"),
    )
    result = evaluate(cfg)
    skipped = result.metrics["skipped_images"]
    assert len(skipped) == 2
    assert result.metrics["images"] == 16
    names = {Path(f["path"]).name for f in skipped}
    assert all(name in (tmp_path / "summary.md").read_text() for name in names)
    assert len((tmp_path / "skipped_images.txt").read_text().splitlines()) == 2
    assert np.load(tmp_path / "scores.npz")["scores"].shape[1] == 16


def test_bad_image_error_names_the_file(bad_coco, tmp_path: Path, capsys) -> None:
    """Under the default policy the run stops with one message naming the corrupt file
    and the fix (exit status 2), and keeps the shards it already wrote."""
    code = main(
        [
            "eval",
            "demo",
            *_overrides(bad_coco, tmp_path, "loader.batch_size=4", "logger.wandb.mode=disabled"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "error:" in err
    assert ".jpg" in err
    assert "data.on_bad_image=skip" in err
    assert list((tmp_path / "embeddings").glob("*.safetensors"))  # 16 good images first


def test_rescoring_reuses_embeddings(synthetic_coco, tmp_path: Path, monkeypatch) -> None:
    """A second run that changes only prompts/protocol re-scores the stored shards:
    the backbone never runs (encode_images would raise)."""
    base = _overrides(synthetic_coco, tmp_path, "logger.wandb.mode=disabled")
    first = evaluate(load_config("demo", base))
    assert first.embedded

    def boom(*args, **kwargs):
        raise AssertionError("backbone ran on a re-score")

    monkeypatch.setattr(ClipRetriever, "encode_images", boom)
    second = evaluate(load_config("demo", [*base, "text.prompts=single", "protocol.top_k=5"]))
    assert not second.embedded
    assert "map@5" in second.metrics
    assert second.metrics["protocol"]["prompts"] == "single"
    with pytest.raises(ConfigError, match="different settings"):
        evaluate(load_config("demo", [*base, "retriever.backbone=ViT-tiny"]))


def test_a_run_stores_its_data_paths_absolute(synthetic_coco, tmp_path: Path, monkeypatch) -> None:
    """Relative data paths on the command line are stored absolute in the run's
    config.yaml, so a server or a gallery started from another folder finds the images;
    the embeddings' data fingerprint is the same either way."""
    from retrieval.config import load_stored_config
    from retrieval.store import ShardStore

    ann, images = synthetic_coco
    monkeypatch.chdir(ann.parent)
    evaluate(load_config("demo", _overrides((Path(ann.name), Path(images.name)), tmp_path / "r")))
    stored = load_stored_config(tmp_path / "r" / "config.yaml")
    assert stored.data.annotations == str(ann.resolve())
    assert stored.data.images == str(images.resolve())
    fingerprint = ShardStore(tmp_path / "r" / "embeddings").read_manifest()["fingerprint"]
    assert fingerprint["data"]["annotations"] == str(ann.resolve())

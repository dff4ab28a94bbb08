"""`retrieval sweep`: planning (shared extractions), running, skipping, resuming, failing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.cli import main
from retrieval.config import ConfigError, load_config
from retrieval.engine import evaluate
from retrieval.errors import MissingFileError
from retrieval.retrievers.dense_clip import DenseClipRetriever
from retrieval.store import ShardStore
from retrieval.sweep.plan import plan_sweep
from retrieval.sweep.run import run_sweep
from retrieval.sweep.spec import list_sweeps, load_sweep

ROOT = Path(__file__).resolve().parent.parent
SCENES_ROWS = ("clip", "dense_clip", "cluster_clip_km", "cluster_clip_agf")
FAST = [
    "retriever.pretrained=null",  # random RN-scenes: the pipeline, seconds per run
    "store.dtype=float32",  # re-aggregation then equals aggregation from pixels
    "run.progress=false",
    "loader.num_workers=0",
    "logger.wandb.mode=disabled",
]


SHIPPED = ("retriever.pretrained=scenes", "loader.batch_size=64")


def _data(synthetic_coco) -> list[str]:
    ann, images = synthetic_coco
    return [f"data.annotations={ann}", f"data.images={images}", "prepare=none"]


def _scenes(tmp_path: Path, synthetic_coco, *extra: str):
    return load_sweep("scenes", [*_data(synthetic_coco), f"out={tmp_path}", *FAST, *extra])


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("name", list_sweeps())
def test_every_shipped_sweep_plans(name: str, tmp_path: Path) -> None:
    """Every shipped sweep's experiments validate (no data needed to plan); into an empty
    folder every run is still to do."""
    runs = plan_sweep(load_sweep(name, [f"out={tmp_path}"]), prepare_data=False)
    assert runs
    assert all(r.status == "todo" for r in runs)


def test_paper_table_needs_one_extraction_per_backbone() -> None:
    """The COCO table: 20 rows, 6 backbone passes (3 OWL-ViT, and one per ResNet: the CLIP
    + Dense-CLIP row, whose cells every other dense row of its backbone uses and whose
    native-size global embedding is the CLIP row's)."""
    runs = {r.name: r for r in plan_sweep(load_sweep("paper-coco"), prepare_data=False)}
    assert len(runs) == 20
    assert not any(r.hidden for r in runs.values())
    backbone = sorted(n for n, r in runs.items() if r.uses_backbone)
    assert backbone == sorted(
        ["owlvit_b32", "owlvit_b16", "owlvit_l14"]
        + ["clip_dense_clip_rn50", "clip_dense_clip_rn50x4", "clip_dense_clip_rn50x64"]
    )
    for name, run in runs.items():
        if "rn50x64" in name and not run.uses_backbone:
            assert run.source == "clip_dense_clip_rn50x64"
            assert run.cfg.store.dense_from == str(runs[run.source].run_dir)
    assert runs["dense_clip_rn50"].source == "clip_dense_clip_rn50"
    assert runs["clip_rn50x4"].source == "clip_dense_clip_rn50x4"
    order = list(runs)
    assert all(order.index(r.source) < order.index(n) for n, r in runs.items() if r.source)


def test_lone_cluster_rows_get_a_hidden_extraction(tmp_path: Path) -> None:
    """Two Cluster-CLIP rows and no Dense-CLIP row: one hidden extraction feeds both."""
    sweep_file = tmp_path / "two.yaml"
    sweep_file.write_text(
        "experiments:\n  km: cluster_clip_km_rn50x64_coco\n  agf: cluster_clip_agf_rn50x64_coco\n"
    )
    runs = plan_sweep(load_sweep(sweep_file, [f"out={tmp_path}"]), prepare_data=False)
    assert [r.name for r in runs][1:] == ["km", "agf"]
    assert runs[0].hidden
    extraction = runs[0]
    assert extraction.cfg.retriever.name == "dense_clip"
    assert not extraction.cfg.retriever.with_global
    assert extraction.cfg.retriever.resolution == 448
    assert all(r.source == extraction.name for r in runs[1:])


def test_scenes_sweep_equals_separate_evals_and_runs_the_backbone_once(
    synthetic_coco, tmp_path: Path, monkeypatch
) -> None:
    """The scenes sweep's four rows have the metrics of four separate `evaluate` calls
    (Cluster-CLIP from pixels), while Dense-CLIP features are computed once for the
    three dense rows; a second invocation runs nothing."""
    calls = {"dense": 0}
    original = DenseClipRetriever.encode_dense

    def counted(self, pixels):
        calls["dense"] += 1
        return original(self, pixels)

    monkeypatch.setattr(DenseClipRetriever, "encode_dense", counted)
    # the shipped weights: random ones make near-tied cells, where k-means may split
    # differently on inputs that differ by float rounding
    sweep = _scenes(tmp_path / "sweep", synthetic_coco, *SHIPPED)
    runs = plan_sweep(sweep)
    assert [r.source for r in runs] == [None, None, "dense_clip", "dense_clip"]
    outcome = run_sweep(runs)
    assert [o.state for o in outcome.outcomes] == ["ran"] * 4
    assert calls["dense"] == 1  # 24 images, one batch: the dense_clip run's pass, only

    for name in SCENES_ROWS:
        experiment = next(e for e in sweep.experiments if e.name == name)
        overrides = [*sweep.overrides, f"run.output_dir={tmp_path / 'alone' / name}"]
        evaluate(load_config(experiment.config, overrides))
        swept, alone = (
            _metrics(tmp_path / "sweep" / "runs" / name),
            _metrics(tmp_path / "alone" / name),
        )
        for key in ("map@50", "map@50_s-m", "map"):
            assert swept[key] == pytest.approx(alone[key], abs=1e-9), (name, key)
        assert swept["reps_per_image"] == alone["reps_per_image"]

    again = plan_sweep(_scenes(tmp_path / "sweep", synthetic_coco, *SHIPPED))
    assert [r.status for r in again] == ["done"] * 4
    ran = []
    outcome = run_sweep(again, evaluate=ran.append)
    assert not ran
    assert [o.state for o in outcome.outcomes] == ["skipped"] * 4


def test_dense_and_clip_rows_take_their_part_of_a_global_extraction(
    synthetic_coco, tmp_path: Path
) -> None:
    """Planned onto a CLIP + Dense-CLIP extraction (global pass at the native size), a
    Dense-CLIP row stores exactly the cells a Dense-CLIP run from pixels stores, and a
    CLIP row the global embedding a CLIP run from pixels computes: same scores."""
    sweep_file = tmp_path / "dense.yaml"
    sweep_file.write_text(
        "experiments:\n"
        "  global: {config: demo, overrides: [retriever=clip_rn50]}\n"
        "  with_global:\n"
        "    config: demo\n"
        "    overrides: [retriever=clip_dense_clip_rn50, retriever.resolution=128]\n"
        "  cells:\n"
        "    config: demo\n"
        "    overrides: [retriever=dense_clip_rn50, retriever.resolution=128]\n"
    )
    tiny = ["retriever.backbone=RN-tiny"]
    sweep = load_sweep(sweep_file, [*_data(synthetic_coco), f"out={tmp_path}", *FAST, *tiny])
    runs = plan_sweep(sweep)
    assert [r.name for r in runs] == ["with_global", "global", "cells"]
    assert [r.source for r in runs] == [None, "with_global", "with_global"]
    assert [o.state for o in run_sweep(runs).outcomes] == ["ran"] * 3
    for name, retriever, extra in (
        ("cells", "dense_clip_rn50", ["retriever.resolution=128"]),
        ("global", "clip_rn50", []),
    ):
        direct = tmp_path / "direct" / name
        overrides = [*sweep.overrides, f"retriever={retriever}", *tiny, *extra]
        evaluate(load_config("demo", [*overrides, f"run.output_dir={direct}"]))
        a = np.load(tmp_path / "runs" / name / "scores.npz")["scores"]
        b = np.load(direct / "scores.npz")["scores"]
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_a_failed_run_does_not_stop_the_others(synthetic_coco, tmp_path: Path) -> None:
    """A row whose images are missing fails with its message; the rows reading its
    shards are blocked, said so; the rest run; the command exits 1 with a summary."""
    ann, _ = synthetic_coco
    sweep_file = tmp_path / "broken.yaml"
    sweep_file.write_text(
        "experiments:\n"
        "  clip: scenes_clip\n"
        f"  dense_clip: {{config: scenes_dense_clip, overrides: [data.images={tmp_path}/none]}}\n"
        "  cluster_clip_km: scenes_cluster_clip_km\n"
    )
    sweep = load_sweep(sweep_file, [*_data(synthetic_coco), f"out={tmp_path}", *FAST])
    runs = plan_sweep(sweep)
    outcome = run_sweep(runs)
    states = {o.name: o.state for o in outcome.outcomes}
    # the dense row's data differs from the cluster row's: no sharing, both fail alone
    assert states["clip"] == "ran"
    assert states["dense_clip"] == "failed"
    assert "none" in next(o.message for o in outcome.outcomes if o.name == "dense_clip")
    code = main(["sweep", str(sweep_file), *_data(synthetic_coco), f"out={tmp_path}", *FAST])
    assert code == 1  # the failed row again; the finished ones skipped
    with pytest.raises(MissingFileError, match="image folder not found"):
        run_sweep(plan_sweep(sweep), fail_fast=True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("experiment: {}\n", "unknown key 'experiment'"),
        ("experiments: {a: {config: demo, overide: []}}\n", "unknown keys ['overide']"),
        ("experiments: {'../x': demo}\n", "plain folder name"),
        ("experiments: {a: demo}\noverrides: [nokey]\n", "key=value"),
        ("experiments: {a: nosuchconfig}\n", "experiment 'a'"),
        ("experiments: {a: demo}\nreference: papers\n", "reference must be 'paper' or 'none'"),
        ("experiments: {a: demo}\ncategory_groups: {x: 3}\n", "category_groups must map"),
        ("experiments: {a: demo}\nprepare: scenez\n", "unknown data step 'scenez'"),
    ],
)
def test_bad_sweep_files_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan_sweep(load_sweep(path, [f"out={tmp_path}"]))


def test_dry_run_prints_the_plan(synthetic_coco, tmp_path: Path, capsys, monkeypatch) -> None:
    """--dry-run --calibrate: the plan with images left, disk and a measured time; no run
    folder is written."""
    monkeypatch.setenv("COLUMNS", "200")  # rich: the whole table, not cells cut at 80
    args = [*_data(synthetic_coco), f"out={tmp_path}", *FAST]
    assert main(["sweep", "scenes", *args, "--dry-run", "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "24 of 24" in out
    assert "dense_clip (no backbone)" in out
    assert "2 backbone passes over 48 images" in out
    assert " s (measured" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_killed_sweep_completes_only_what_is_missing(synthetic_coco, tmp_path: Path) -> None:
    """SIGKILL while the sweep runs, then the same command: finished runs are skipped,
    the rest run; the results equal an uninterrupted sweep's."""
    command = [
        sys.executable, "-m", "retrieval.cli", "sweep", "scenes",
        *_data(synthetic_coco), f"out={tmp_path / 'killed'}", *FAST,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "killed" / "runs" / "dense_clip" / "metrics.json"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert first.exists()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "dense_clip: already done" in rerun.stdout
    main(["sweep", "scenes", *_data(synthetic_coco), f"out={tmp_path / 'whole'}", *FAST])
    for name in SCENES_ROWS:
        killed = _metrics(tmp_path / "killed" / "runs" / name)
        whole = _metrics(tmp_path / "whole" / "runs" / name)
        assert killed["map@50"] == pytest.approx(whole["map@50"], abs=1e-9), name


#: rows whose stored values come straight from the backbone (no k-means between)
DIRECT_ROWS = ("clip", "dense_clip")
#: |metric(1 process) - metric(2 processes)|, every row: docs/protocol.md, Reproducibility
METRIC_TOLERANCE = 0.02


def _sweep_processes(synthetic_coco, out: Path, devices: int) -> None:
    """`retrieval sweep scenes` in a fresh interpreter, fp16 storage, one thread per
    process, on ``devices`` CPU processes (DDP: Lightning re-runs the command for rank 1)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "retrieval.cli", "sweep", "scenes", *_data(synthetic_coco)]
    argv += [*FAST, "store.dtype=float16", "trainer.accelerator=cpu", f"out={out}"]
    if devices > 1:
        argv += [f"trainer.devices={devices}", "trainer.strategy=ddp"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("[1/4] dense_clip") == 1  # rank 1 prints nothing of the plan


def _stored(run_dir: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """image id -> (embeddings [R, D] as stored, mask [R]) over every shard of a run."""
    out = {}
    for shard in ShardStore(run_dir / "embeddings").iter_shards():
        emb, mask = shard.reps.embeddings.numpy(), shard.reps.mask.numpy()
        for k, image_id in enumerate(shard.image_ids.tolist()):
            out[image_id] = (emb[k], mask[k])
    return out


@pytest.mark.slow
def test_the_same_sweep_twice_is_bit_identical(synthetic_coco, tmp_path: Path) -> None:
    """The exact promise: the same command on the same machine stores bit-identical
    values in every row (k-means rows included) and writes identical metrics (all but
    the wall-clock timing)."""
    for name in ("first", "again"):
        _sweep_processes(synthetic_coco, tmp_path / name, devices=1)
    for row in SCENES_ROWS:
        first, again = (_stored(tmp_path / n / "runs" / row) for n in ("first", "again"))
        assert first, row
        assert first.keys() == again.keys(), row
        for image_id, (emb, mask) in first.items():
            assert emb.tobytes() == again[image_id][0].tobytes(), (row, image_id)
            assert np.array_equal(mask, again[image_id][1]), (row, image_id)
        first_m, again_m = (_metrics(tmp_path / n / "runs" / row) for n in ("first", "again"))
        first_m.pop("timing"), again_m.pop("timing")  # wall-clock seconds
        assert first_m == again_m, row


@pytest.mark.slow
def test_a_sweep_over_two_processes_agrees_with_one(synthetic_coco, tmp_path: Path) -> None:
    """1 vs 2 processes (PyTorch's CPU kernels round an image's low bits by thread count
    and batch neighbours, so bit equality is not a property they give): every image is
    embedded once in each; in the rows whose values come straight from the backbone
    (global CLIP, Dense-CLIP cells) each stored fp16 value is within one fp16 rounding
    step of the other run's (np.spacing at its magnitude), masks equal; every row's
    metrics (k-means rows included, which a one-step change can move to another
    representative) within METRIC_TOLERANCE."""
    for name, devices in (("one", 1), ("two", 2)):
        _sweep_processes(synthetic_coco, tmp_path / name, devices)
    for row in DIRECT_ROWS:
        one, two = (_stored(tmp_path / n / "runs" / row) for n in ("one", "two"))
        assert one, row
        assert one.keys() == two.keys(), row
        for image_id, (emb, mask) in one.items():
            other, other_mask = two[image_id]
            assert np.array_equal(mask, other_mask), (row, image_id)
            step = np.spacing(np.maximum(np.abs(emb), np.abs(other)))  # fp16 spacing
            assert (np.abs(emb.astype(np.float32) - other) <= step).all(), (row, image_id)
    for row in SCENES_ROWS:
        one, two = (_metrics(tmp_path / n / "runs" / row) for n in ("one", "two"))
        assert one["images"] == two["images"]
        for key in ("map@50", "map@50_s-m", "map"):
            assert abs(one[key] - two[key]) <= METRIC_TOLERANCE, (row, key, one[key], two[key])

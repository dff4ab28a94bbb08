"""bench/bench_pipeline.py still runs end to end after a refactor (its imports are the
engine's current paths) and reports what its results file promises."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    """The bench script as a module (registered, so a second import reuses it)."""
    if "bench_pipeline" in sys.modules:
        return sys.modules["bench_pipeline"]
    spec = importlib.util.spec_from_file_location(
        "bench_pipeline", ROOT / "bench/bench_pipeline.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_pipeline"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_phase_runs_and_reports_the_goals(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "--images",
        "2",
        "--batch",
        "2",
        "--workers",
        "0",
        "--repeats",
        "1",
        "--score-images",
        "8",
        "--reps",
        "4",
        "--dim",
        "16",
        "--queries",
        "3",
        "--accelerator",
        "cpu",
    ] + ["--json", str(out)]
    report = _bench().main(argv)

    assert json.loads(out.read_text()) == report
    assert report["command"].endswith("--json " + str(out))
    for phase in ("extraction", "scoring"):
        assert report[phase]["framework_img_s"] > 0
        assert report[phase]["plain_img_s"] > 0
    result = report["retrievers"]
    assert result["backbone"] == "RN-tiny"
    assert result["resolution"] == 64
    reps = {row["name"]: row["reps_per_image"] for row in result["rows"]}
    # RN-tiny at 64 px: a 2 x 2 grid, so k=10 and n_clusters=50 keep every cell
    assert reps == {
        "clip (global)": 1.0,
        "dense_clip": 4.0,
        "cluster_clip kmeans k=10": 4.0,
        "cluster_clip agglomerative n_clusters=50": 4.0,
    }
    assert [(r["name"].split(" / ")[1], r["goal"]) for r in result["ratios"]] == [
        ("clip", 1.05),
        ("dense_clip", 1.10),
        ("dense_clip", 1.10),
    ]
    for r in result["ratios"]:
        assert r["met"] == (r["ratio"] <= r["goal"])
    names = [part["name"] for part in result["parts"]]
    assert names[0].startswith("trunk")
    assert "5 queries" in names[1]
    assert all(part["ms_per_image"] > 0 for part in result["parts"])


def test_cpu_clock_is_refused_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        bench.main(["--clock", "cpu", "--phases", "scoring"])

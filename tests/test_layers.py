"""The layer rules of docs/architecture.md hold for real: search loads no run layer, the
score phase needs no Trainer, and the import contracts catch a forbidden import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from probe import run_blocked

from retrieval.index import build_index

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_search_cli_loads_neither_lightning_nor_wandb(dense_run: Path, tmp_path: Path) -> None:
    """`retrieval search INDEX "q" --json --gallery` in a fresh process answers and
    writes both files with Lightning and wandb uninstallable, and no module of ours
    tries to import either (open_clip's timm tries wandb optionally; that is all)."""
    index = build_index(dense_run, "exact", tmp_path / "index", device="cpu", progress=False)
    hits, gallery = tmp_path / "hits.json", tmp_path / "gallery.html"
    argv = ["search", str(index), "a red circle", "--top", "5", "--device", "cpu"]
    argv += ["--json", str(hits), "--gallery", str(gallery)]
    probe = run_blocked(("lightning", "pytorch_lightning", "wandb"), *argv)
    assert probe.status == 0, probe.stderr[-3000:]
    assert probe.loaded == []
    assert probe.ours() == [], probe.attempts
    assert len(json.loads(hits.read_text())["hits"]) == 5
    assert gallery.stat().st_size > 0


def test_score_phase_rescoring_builds_no_trainer(
    dense_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-running a finished run with only a protocol option changed embeds nothing and
    never constructs a Lightning Trainer (the score phase is Lightning-free)."""
    import lightning

    from retrieval.config import load_stored_config
    from retrieval.engine import evaluate

    run = tmp_path / "run"
    shutil.copytree(dense_run, run)
    built = []
    monkeypatch.setattr(lightning, "Trainer", lambda *a, **k: built.append(1))
    cfg = load_stored_config(run / "config.yaml")
    cfg.run.output_dir = str(run)
    cfg.protocol.top_k = 10
    result = evaluate(cfg)
    assert result is not None
    assert result.embedded == 0
    assert built == []
    assert json.loads((run / "metrics.json").read_text())["protocol"]["top_k"] == 10


def _contracts_project(tmp_path: Path) -> Path:
    """A copy of the package with the repository's import contracts beside it."""
    shutil.copytree(
        ROOT / "retrieval",
        tmp_path / "retrieval",
        ignore=shutil.ignore_patterns("__pycache__", "weights", "configs", "*.tsv"),
    )
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    lines = ["[tool.importlinter]"]
    for key in ("root_package", "include_external_packages", "exclude_type_checking_imports"):
        lines.append(f"{key} = {json.dumps(settings[key])}")
    for contract in settings["contracts"]:
        lines.append("[[tool.importlinter.contracts]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in contract.items()]
    (tmp_path / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return tmp_path


def _lint_imports(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(project / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project)},
    )


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
def test_import_contracts_catch_a_forbidden_import(tmp_path: Path) -> None:
    """The contracts pass on the package as it is, and break, naming the chain, once the
    index layer imports the engine (the kind of import they exist to stop)."""
    project = _contracts_project(tmp_path)
    clean = _lint_imports(project)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-2000:]
    search = project / "retrieval" / "index" / "search.py"
    search.write_text(search.read_text() + "\nimport retrieval.engine.embedding  # forbidden\n")
    broken = _lint_imports(project)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout
    assert "retrieval.index.search -> retrieval.engine.embedding" in broken.stdout


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
@pytest.mark.parametrize(
    ("module", "line", "arrow"),
    [
        # the circle issue 25 removed: a component registering through the factory
        (
            "aggregate/kmeans.py",
            "from retrieval.factory import build_dataset",
            "kmeans -> retrieval.factory",
        ),
        # the registry imports nothing of ours but errors
        (
            "registry.py",
            "import retrieval.retrievers.base",
            "registry -> retrieval.retrievers.base",
        ),
        # a dataset reaching up into the index layer
        ("data/collection.py", "import retrieval.index.hits", "collection -> retrieval.index.hits"),
        # the index's own layers: the shared front end and the kernels import no backend
        ("index/base.py", "import retrieval.index.exact", "base -> retrieval.index.exact"),
        ("index/kernels.py", "import retrieval.index.exact", "kernels -> retrieval.index.exact"),
    ],
)
def test_layers_contract_catches_an_arrow_back_up(
    tmp_path: Path, module: str, line: str, arrow: str
) -> None:
    """The core's (and the index's) layers contract breaks, naming the import, when a lower
    layer imports a higher one (run-time imports inside functions count; TYPE_CHECKING
    ones do not)."""
    project = _contracts_project(tmp_path)
    path = project / "retrieval" / module
    path.write_text(path.read_text() + f"\n\ndef _late() -> None:\n    {line}\n")
    broken = _lint_imports(project)
    assert broken.returncode != 0
    assert "is layered" in broken.stdout
    assert arrow in broken.stdout, broken.stdout[-3000:]

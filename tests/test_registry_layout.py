"""Where the registries' functions live (issue 25.1): each kind's register/list/create
beside its base class, the old public names still importable where they were, and
``retrieval.registry`` importing nothing of ours but its errors."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval import registry
from retrieval.index.base import create_backend, open_backend
from retrieval.index.exact import ExactBackend

HOMES = {
    "retrieval.retrievers.base": ("register_retriever", "list_retrievers", "create_retriever"),
    "retrieval.data.base": ("register_dataset", "list_datasets", "create_dataset"),
    "retrieval.aggregate.base": ("register_aggregator", "list_aggregators", "create_aggregator"),
    "retrieval.index.base": ("register_backend", "list_backends", "create_backend", "open_backend"),
}
PUBLISHED = {  # where each name was importable before the move (and still is)
    "retrieval.factory": [name for names in HOMES.values() for name in names],
    "retrieval": ["register_retriever", "list_retrievers", "create_retriever"],
    "retrieval.retrievers": ["register_retriever", "list_retrievers", "create_retriever"],
    "retrieval.data": ["register_dataset", "list_datasets", "create_dataset"],
    "retrieval.aggregate": ["register_aggregator", "list_aggregators", "create_aggregator"],
    "retrieval.index": ["register_backend", "list_backends", "create_backend", "open_backend"],
}


@pytest.mark.parametrize("module", sorted(PUBLISHED))
def test_published_names_are_the_base_modules_functions(module: str) -> None:
    """Every name a user or plugin imported keeps working and is the one function defined
    beside its kind's base class (a re-export, not a second registry front)."""
    home_of = {name: home for home, names in HOMES.items() for name in names}
    published = importlib.import_module(module)
    for name in PUBLISHED[module]:
        home = importlib.import_module(home_of[name])
        assert getattr(published, name) is getattr(home, name), (module, name)
        assert getattr(home, name).__module__ == home_of[name], name


def test_registry_imports_nothing_of_ours_but_errors() -> None:
    """In a fresh interpreter, importing the registry loads only the package root (which
    loads its lazy-name helper), ``retrieval.errors`` and itself: the bottom layer."""
    code = (
        "import json, sys, retrieval.registry; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'retrieval')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = json.loads(done.stdout)
    assert loaded == ["retrieval", "retrieval.errors", "retrieval.lazy", "retrieval.registry"]


def test_backends_need_an_engine_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend registered as a plain factory function, not an Engine class, is refused
    by create_backend and open_backend naming it, instead of an AttributeError from deep
    inside (the front end makes the engine from its class and typed options)."""
    backends = registry.INDEX_BACKENDS
    backends.names()  # the built-ins register into the real table, not the copy below
    monkeypatch.setattr(backends, "factories", dict(backends.factories))
    monkeypatch.setattr(backends, "defaults", dict(backends.defaults))

    def made_by_a_function(folder: Path, dim: int, device: str = "auto") -> ExactBackend:
        raise AssertionError("never called")

    backends.register("by-function")(made_by_a_function)
    for make in (create_backend, open_backend):
        with pytest.raises(TypeError, match="'by-function' is registered as <function"):
            make("by-function", tmp_path / "ix", 4, "cpu")
    assert isinstance(create_backend("exact", tmp_path / "ok", 4, "cpu").engine, ExactBackend)

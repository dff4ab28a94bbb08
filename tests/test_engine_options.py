"""Engines' typed options read back what index manifests store (issue 25).

Invariant: every ``backend_state`` an index manifest holds (these were written by the
release before typed options, after a build and an update) parses into the engine's
options and comes back from ``state()`` unchanged (None, i.e. unset, left out), so
existing index folders open as they are; an unknown key is one ConfigError naming it."""

from __future__ import annotations

from typing import Any

import pytest

from retrieval.errors import ConfigError
from retrieval.index.base import engine_class

STORED: dict[str, dict[str, Any]] = {
    "exact": {},
    "faiss-flat": {"kind": "flat", "overfetch": 2, "segments": [0]},
    "faiss-ivfpq": {
        "kind": "ivfpq",
        "overfetch": 10,
        "nlist": 28,
        "m": 2,
        "nbits": 4,
        "nprobe": 2,
        "train_size": 1093,
        "segments": [0, 1],
    },
    "faiss-ivfpqfs": {
        "kind": "ivfpqfs",
        "overfetch": 400,
        "nlist": 1000,
        "m": 128,
        "nprobe": 256,
        "segments": [0],
    },
    "lancedb": {"index_type": "IVF_FLAT", "nprobes": 2, "num_partitions": 14, "version": 3},
    "milvus": {
        "index_type": "HNSW",
        "vector_type": "float",
        "group_by": "auto",
        "overfetch": 4,
        "timeout": 60.0,
        "load_timeout": 1800.0,
        "uri": None,
        "collection": "representatives",
        "engine": "milvus-lite 3.2.2",
        "grouping": "server",
        "ef_factor": 1,
    },
}


@pytest.mark.parametrize("name", sorted(STORED))
def test_stored_state_round_trips(name: str) -> None:
    options = engine_class(name).Options.parse(name, STORED[name])
    assert options.state() == {k: v for k, v in STORED[name].items() if v is not None}


@pytest.mark.parametrize("name", sorted(STORED))
def test_unknown_option_is_refused_naming_it(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"{name!r} has no option 'bogus' \(it accepts: "):
        engine_class(name).Options.parse(name, {**STORED[name], "bogus": 1})


@pytest.mark.parametrize("name", sorted(STORED))
def test_every_unset_option_says_what_the_engine_does(name: str) -> None:
    """Invariant: `retrieval list` shows each built-in option as ``key=value`` or
    ``key=<what happens when it is unset>``, never a bare key a user cannot read."""
    shown = engine_class(name).Options().shown().split(", ")
    keys = engine_class(name).Options.settable()
    assert len(shown) >= len(keys)  # a description may hold ", " itself
    for key in keys:
        assert any(part.startswith(f"{key}=") for part in shown), (key, shown)


def test_a_plugins_unset_option_is_shown_bare() -> None:
    """A plugin's option without a ``chosen`` field still lists (its bare key)."""
    from dataclasses import dataclass

    from retrieval.index.engine import EngineOptions, chosen

    @dataclass
    class PluginOptions(EngineOptions):
        depth: int = 3
        width: int | None = None
        probes: int | None = chosen("tuned")

    assert PluginOptions().shown() == "depth=3, width, probes=<tuned>"


def test_a_bad_choice_is_refused_naming_the_option() -> None:
    with pytest.raises(ConfigError, match="faiss kind 'flta' is not one of .*'flat'"):
        engine_class("faiss").Options.parse("faiss", {"kind": "flta"})


def test_faiss_auto_is_flat_then_fast_scan(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: ``--backend faiss`` (kind auto) is exact flat codes up to
    ``FLAT_MAX_ROWS`` representatives and fast-scan PQ (``ivfpqfs``) above; the kind
    chosen is what the manifest stores."""
    from retrieval.index import build_index, faiss_backend, open_index
    from tests.test_search import make_run

    run = make_run(tmp_path / "run", [(range(300), 8)])  # 2,400 representatives
    flat = build_index(run, "faiss", tmp_path / "flat", "cpu", progress=False)
    monkeypatch.setattr(faiss_backend, "FLAT_MAX_ROWS", 1000)
    compressed = build_index(run, "faiss", tmp_path / "fs", "cpu", progress=False)
    with open_index(flat, "cpu") as a, open_index(compressed, "cpu") as b:
        assert a.manifest.backend_state["kind"] == "flat"
        assert b.manifest.backend_state["kind"] == "ivfpqfs"

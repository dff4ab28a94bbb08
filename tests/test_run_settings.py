"""Config validates, the factory builds, the engine reads typed sections: the engine's
sections are the schema's own dataclasses (their defaults are the schema's), nothing in
the engine or the factory repeats a default with ``.get``, and data paths are resolved in
one place, so every phase sees a relative path alike."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import retrieval
from retrieval.config import EvalConfig, load_config, load_stored_config, validate
from retrieval.engine.settings import RunSettings
from retrieval.factory import build_dataset, data_fingerprint
from retrieval.store import ShardStore


def test_engine_sections_take_their_defaults_from_the_schema() -> None:
    """Invariant: each section the engine reads is the config schema's dataclass for it
    (same type as ``EvalConfig``'s field), and a config that sets none of its keys gives
    exactly the schema's defaults: the engine holds no default of its own."""
    schema = typing.get_type_hints(EvalConfig)
    for name, kind in typing.get_type_hints(RunSettings).items():
        assert kind is schema[name], name
    cfg = validate(OmegaConf.create({"retriever": {"name": "clip"}, "data": {"name": "coco"}}))
    settings = RunSettings.of(cfg)
    for f in dataclasses.fields(RunSettings):
        section = getattr(settings, f.name)
        assert section == schema[f.name](), f.name  # the schema's defaults, field by field


def test_the_engine_and_factory_repeat_no_config_default() -> None:
    """Invariant: no engine or factory module reads a config node with ``.get(key,
    default)``: the validated config holds every schema key, so such a default is a
    second copy that drifts (``cfg.run.get("verify", "fast")`` once did)."""
    root = Path(retrieval.__file__).parent
    read = re.compile(r"\b(cfg|config)(\.\w+)*\.get\(")
    offenders = [
        f"{path.relative_to(root)}:{k + 1}"
        for path in [*sorted((root / "engine").glob("*.py")), root / "factory.py"]
        for k, line in enumerate(path.read_text(encoding="utf-8").splitlines())
        if read.search(line)
    ]
    assert offenders == []


def test_a_relative_data_path_resolves_the_same_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: data paths are resolved once, when the config is validated: a relative
    ``data.images`` (through a symlink) gives the same config, data fingerprint and
    dataset root as the real absolute path, and the run's stored ``config.yaml`` (what
    ``retrieval index build`` and ``serve`` read) holds that path, read back alike from
    another working directory."""
    from retrieval.engine import embed

    real = tmp_path / "real" / "photos"
    real.mkdir(parents=True)
    for k in range(2):
        pixels = np.random.default_rng(k).integers(0, 255, (32, 32, 3), np.uint8)
        Image.fromarray(pixels).save(real / f"{k}.png")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "photos").symlink_to(real)
    monkeypatch.chdir(tmp_path / "work")
    common = [
        "dataset=folder",
        "retriever.pretrained=null",
        "retriever.backbone=RN-tiny",
        "run.progress=false",
        "loader.num_workers=0",
        f"run.output_dir={tmp_path / 'run'}",
    ]
    relative = load_config("demo", [*common, "data.images=photos"])
    absolute = load_config("demo", [*common, f"data.images={real.resolve()}"])
    assert relative.data.images == str(real.resolve())
    assert relative.data == absolute.data
    assert data_fingerprint(relative) == data_fingerprint(absolute)
    assert build_dataset(relative).images_dir == real.resolve()

    embed(relative)
    manifest = ShardStore(tmp_path / "run" / "embeddings").read_manifest()
    assert manifest["fingerprint"]["data"] == data_fingerprint(absolute)
    os.chdir(tmp_path)
    stored = load_stored_config(tmp_path / "run" / "config.yaml")
    assert stored.data == absolute.data

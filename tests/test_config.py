"""Config composition, overrides and validation (errors before any work starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.config import ConfigError, load_config, to_yaml


def test_experiment_composes_its_groups() -> None:
    """An experiment's defaults pull the dataset and retriever group files in."""
    cfg = load_config("clip_rn50_coco")
    assert cfg.data.name == "coco"
    assert cfg.data.annotations.endswith("instances_val2017.json")
    assert cfg.retriever.name == "clip"
    assert cfg.retriever.backbone == "RN50"
    assert cfg.retriever.pretrained == "openai"
    assert cfg.run.output_dir == "runs/clip_rn50_coco"


def test_key_value_and_group_overrides() -> None:
    """key=value sets a key; group=name swaps a group file; both beat the file."""
    cfg = load_config(
        "clip_rn50_coco", ["retriever=clip_rn50x64", "loader.batch_size=7", "data.images=/x"]
    )
    assert cfg.retriever.backbone == "RN50x64"
    assert cfg.loader.batch_size == 7
    assert cfg.data.images == "/x"


def test_config_file_path_and_resolved_yaml(tmp_path: Path) -> None:
    """A YAML path works as CONFIG, and the saved YAML reloads to the same config."""
    path = tmp_path / "mine.yaml"
    path.write_text("defaults:\n  - dataset: coco\n  - retriever: clip_tiny\nrun:\n  seed: 5\n")
    cfg = load_config(path)
    assert cfg.run.seed == 5
    assert cfg.retriever.backbone == "RN-tiny"
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loader.batch_sise=4", "Did you mean 'loader.batch_size'"),
        ("data.anotations=a.json", "Did you mean 'data.annotations'"),
        ("retriever.backbon=RN50", "Did you mean 'retriever.backbone'"),
        ("trainr.devices=2", "Did you mean 'trainer'"),
    ],
)
def test_unknown_key_names_the_closest(override: str, expected: str) -> None:
    """A misspelt key fails naming the closest valid one, top level and nested."""
    with pytest.raises(ConfigError, match=expected):
        load_config("clip_rn50_coco", [override])


def test_wrong_type_names_key() -> None:
    """A value of the wrong type fails naming the key."""
    with pytest.raises(ConfigError, match="loader.batch_size"):
        load_config("clip_rn50_coco", ["loader.batch_size=many"])


def test_bad_choice_lists_choices() -> None:
    """An enumerated option rejects other values and lists the valid ones."""
    with pytest.raises(ConfigError, match="error, skip"):
        load_config("clip_rn50_coco", ["data.on_bad_image=ignore"])


def test_unknown_retriever_and_config_names() -> None:
    """Unknown retriever or config file names get did-you-mean messages."""
    with pytest.raises(ConfigError, match="Did you mean 'clip'"):
        load_config("clip_rn50_coco", ["retriever.name=clipp"])
    with pytest.raises(ConfigError, match="Did you mean 'clip_rn50'"):
        load_config("clip_rn50_coco", ["retriever=clip_rn5"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_experiment")

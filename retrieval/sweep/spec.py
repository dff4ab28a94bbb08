"""A sweep file: the experiments of a table and what they share.

A sweep is YAML under ``configs/sweep/`` (or a path)::

    description: the paper's COCO rows
    out: runs/sweeps/paper-coco          # runs/<name>, the summary, compare's files
    overrides: [text.prompts=imagenet80]  # for every experiment
    prepare: null                         # or a named data step, e.g. scenes
    reference: paper                      # compare against the paper's table (or none)
    category_groups: {}                   # extra columns: name -> category names
    experiments:
      clip_rn50: clip_rn50_coco           # run name -> experiment config
      cluster_km:
        config: cluster_clip_km_rn50x64_coco
        overrides: [retriever.aggregate.k=12]

Command-line ``key=value`` pairs apply to every experiment after the file's own; three
keys belong to the sweep itself: ``out=DIR`` (also ``run.root=DIR``), ``data.root=DIR``
(the dataset groups' ``data/...`` paths are rooted there instead) and ``prepare=none``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.config import CONFIG_DIR, read_yaml
from retrieval.errors import ConfigError, did_you_mean

SWEEP_DIR = CONFIG_DIR / "sweep"
TOP_KEYS = (
    "description",
    "out",
    "overrides",
    "prepare",
    "reference",
    "category_groups",
    "experiments",
)
#: command-line keys that set the sweep, not the runs
SWEEP_KEYS = {"out": "out", "run.root": "out", "data.root": "data_root", "prepare": "prepare"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Experiment:
    """One row of the sweep: a run name, its experiment config and its own overrides."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()


@dataclass
class Sweep:
    """A parsed sweep file plus the command line's overrides."""

    name: str
    path: Path
    experiments: list[Experiment]
    out: Path
    overrides: list[str] = field(default_factory=list)
    description: str = ""
    prepare: str | None = None
    reference: str = "paper"
    data_root: str | None = None
    category_groups: dict[str, list[str]] = field(default_factory=dict)

    def run_overrides(self, experiment: Experiment) -> list[str]:
        """Overrides of one run: the sweep's, the experiment's, then where it writes."""
        return [
            *self.overrides,
            *experiment.overrides,
            f"run.output_dir={self.out / 'runs' / experiment.name}",
            f"logger.wandb.group={self.name}",
        ]


def find_sweep(name: str | Path) -> Path:
    """A sweep file: a path, or a name under ``configs/sweep/``."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"sweep file not found: {path}")
        return path
    candidate = SWEEP_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))
    raise ConfigError(
        f"sweep {str(name)!r} not found in configs/sweep/ or as a .yaml path."
        f"{did_you_mean(str(name), known)} Known: {', '.join(known)}"
    )


def list_sweeps() -> list[str]:
    """The shipped sweeps' names."""
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of key=value strings, got {value!r}")
    for item in value:
        if "=" not in item:
            raise ConfigError(f"{where}: override {item!r} must look like key=value")
    return list(value)


def _experiments(value: Any, path: Path) -> list[Experiment]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(
            f"{path}: 'experiments' must map run names to experiment configs "
            f"(e.g. clip_rn50: clip_rn50_coco)"
        )
    out = []
    for name, entry in value.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(
                f"{path}: experiment name {name!r} must be a plain folder name "
                f"(letters, digits, '_', '-', '.')"
            )
        if isinstance(entry, str):
            out.append(Experiment(name, entry))
        elif isinstance(entry, dict) and isinstance(entry.get("config"), str):
            unknown = set(entry) - {"config", "overrides"}
            if unknown:
                raise ConfigError(
                    f"{path}: experiment {name!r} has unknown keys {sorted(unknown)}; "
                    f"it takes 'config' and 'overrides'"
                )
            where = f"{path}: experiments.{name}.overrides"
            out.append(
                Experiment(name, entry["config"], tuple(_strings(entry.get("overrides"), where)))
            )
        else:
            raise ConfigError(
                f"{path}: experiment {name!r} must be a config name or a mapping with "
                f"'config' (and optional 'overrides'), got {entry!r}"
            )
    return out


def _groups(value: Any, path: Path) -> dict[str, list[str]]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in value.values()
    ):
        raise ConfigError(f"{path}: category_groups must map a name to a list of category names")
    return {str(k): list(v) for k, v in value.items()}


def load_sweep(name: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Reads and checks a sweep file; ``overrides`` are the command line's ``key=value``.

    Raises:
        ConfigError: an unknown key, a malformed entry or override (names the file).
    """
    path = find_sweep(name)
    content = read_yaml(path)
    unknown = sorted(set(content) - set(TOP_KEYS))
    if unknown:
        hint = did_you_mean(unknown[0], list(TOP_KEYS))
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}.{hint} Keys: {', '.join(TOP_KEYS)}")
    own: dict[str, Any] = {}
    passed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        if key in SWEEP_KEYS:
            own[SWEEP_KEYS[key]] = value
        else:
            passed.append(item)
    reference = content.get("reference", "paper")
    if reference not in ("paper", "none"):
        raise ConfigError(f"{path}: reference must be 'paper' or 'none', got {reference!r}")
    prepare = own.get("prepare", content.get("prepare"))
    return Sweep(
        name=path.stem,
        path=path,
        experiments=_experiments(content.get("experiments"), path),
        out=Path(own.get("out") or content.get("out") or f"runs/sweeps/{path.stem}"),
        overrides=[*_strings(content.get("overrides"), f"{path}: overrides"), *passed],
        description=str(content.get("description") or ""),
        prepare=None if prepare in (None, "none", "null") else str(prepare),
        reference=reference,
        data_root=own.get("data_root"),
        category_groups=_groups(content.get("category_groups"), path),
    )

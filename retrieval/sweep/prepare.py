"""Data steps a sweep may name (``prepare:``): make its data before planning reads it.

Only data that can be made here: the scenes benchmark's generated evaluation set. Real
datasets are the user's (``retrieval data check`` says what is missing). A step writes
only into a folder it created and marked as its own (``retrieval.data.synthetic``'s
marker) and refuses any other, naming it; ``retrieval sweep --dry-run`` prints what it
would write (:func:`describe`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from retrieval.errors import ConfigError, did_you_mean


def _scenes_folders(cfgs: Sequence[DictConfig]) -> list[Path]:
    """The folders the scenes step generates into: each run's ``data.annotations``'s
    folder, whose ``images/`` must be the run's ``data.images`` (the generator writes
    the two side by side).

    Raises:
        ConfigError: a run's ``data.images`` is not ``images/`` beside its annotations.
    """
    folders = set()
    for cfg in cfgs:
        folder = Path(str(cfg.data.annotations)).parent
        images = Path(str(cfg.data.images))
        if images.absolute() != (folder / "images").absolute():
            raise ConfigError(
                f"prepare: scenes generates annotations.json and images/ side by side, but "
                f"data.images={images} is not {folder / 'images'} (beside "
                f"data.annotations={cfg.data.annotations}). Nothing was written: point both "
                f"at one new folder, or set prepare=none to use your own data as it is"
            )
        folders.add(folder)
    return sorted(folders)


def _scenes_plan(cfgs: Sequence[DictConfig]) -> list[str]:
    from retrieval.data.synthetic import generation_state, scenes_options

    options = scenes_options("eval")
    return [generation_state(f, options).describe() for f in _scenes_folders(cfgs)]


def _scenes_run(cfgs: Sequence[DictConfig]) -> None:
    """Generates the held-out scenes (``scenes`` preset) where the runs' annotations
    point (``<dir>/annotations.json`` + ``<dir>/images``), unless already there."""
    from retrieval.data.synthetic import ensure_synthetic, generation_state, scenes_options

    options = scenes_options("eval")
    folders = _scenes_folders(cfgs)
    for folder in folders:  # every folder checked before any is written
        generation_state(folder, options)
    for folder in folders:
        ensure_synthetic(folder, options)


@dataclass(frozen=True)
class Step:
    """A data step: ``plan`` says what ``run`` would write, writing nothing."""

    run: Callable[[Sequence[DictConfig]], None]
    plan: Callable[[Sequence[DictConfig]], list[str]]


STEPS: dict[str, Step] = {"scenes": Step(_scenes_run, _scenes_plan)}


def _step(name: str) -> Step:
    if name not in STEPS:
        raise ConfigError(
            f"prepare: unknown data step {name!r}.{did_you_mean(name, list(STEPS))} "
            f"Known: {', '.join(STEPS)} (or none)"
        )
    return STEPS[name]


def prepare(name: str, cfgs: Sequence[DictConfig]) -> None:
    """Runs the named data step over the sweep's run configs.

    Raises:
        ConfigError: an unknown step, or a folder it may not write (nothing is written).
    """
    _step(name).run(cfgs)


def describe(name: str, cfgs: Sequence[DictConfig]) -> list[str]:
    """What the named step would write, one line per folder; nothing is written.

    Raises:
        ConfigError: as :func:`prepare` would.
    """
    return [f"prepare {name}: {line}" for line in _step(name).plan(cfgs)]

"""Planning a sweep: which runs share one Dense-CLIP extraction, what is already done.

The backbone pass is the cost of a table; aggregations are cheap. So every Dense-CLIP /
Cluster-CLIP row whose dense features are the same (same data, backbone, weights,
resolution and every other feature option, precision, storage dtype and seed) reads them
from one extraction run (``store.dense_from``): a ``dense_clip`` row of the sweep when
one matches, else a hidden run ``_extract-<backbone>-<resolution>-<n>`` added for it.
Rows that append the global embedding (CLIP + X) need an extraction that kept it with
the same ``global_pass``; a ``dense_clip`` row without it is then the extraction's cells
alone, and a global CLIP row at its native size is the global embedding of an extraction
whose ``global_pass`` is ``native`` (the same model on the same view). A lone row is
embedded directly (an extraction would only add disk).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from retrieval.config import (
    as_dict,
    load_config,
    load_stored_config,
    retriever_schema,
    validate,
    with_absolute_paths,
)
from retrieval.errors import ConfigError, RetrievalError, differences
from retrieval.factory import data_fingerprint
from retrieval.sweep.spec import Experiment, Sweep

DENSE_FAMILY = ("dense_clip", "cluster_clip")
#: retriever options that change what is done with the dense cells, not the cells
AGGREGATION_KEYS = ("name", "aggregate", "keep_members", "with_global", "global_pass")
#: config keys that never change a run's results (a finished run with other values is done)
COSMETIC = ("run.progress", "logger", "loader.num_workers")


@dataclass
class PlannedRun:
    """One run of the sweep, in the order it will run."""

    name: str
    cfg: DictConfig
    hidden: bool = False  # an extraction the planner added (not a row of the table)
    source: str | None = None  # the run whose dense shards it reads (no backbone)
    status: str = "todo"  # done | partial | changed | todo
    detail: str = ""  # why it is not done, or what differs

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)

    @property
    def uses_backbone(self) -> bool:
        return self.source is None


def _shared_key(cfg: DictConfig, retriever: dict[str, Any]) -> str:
    """Runs with equal keys store equal embeddings for ``retriever``'s part: the data,
    those retriever options, precision, storage dtype and seed (random weights)."""
    return json.dumps(
        {
            "data": data_fingerprint(cfg),
            "retriever": retriever,
            "precision": cfg.trainer.precision,
            "dtype": cfg.store.dtype,
            "seed": cfg.run.seed,
        },
        sort_keys=True,
        default=str,
    )


def _features_key(cfg: DictConfig) -> str | None:
    """What fixes a dense-family run's cells (None: not dense-family, or already told
    where its features come from)."""
    if cfg.retriever.name not in DENSE_FAMILY or cfg.store.dense_from:
        return None
    options = as_dict(cfg.retriever)
    return _shared_key(cfg, {k: v for k, v in options.items() if k not in AGGREGATION_KEYS})


def _global_need(cfg: DictConfig) -> str | None:
    """The ``global_pass`` a row needs kept with the cells, or None (cells alone)."""
    return str(cfg.retriever.global_pass) if cfg.retriever.with_global else None


def _extraction_cfg(cfg: DictConfig, need: str | None, out: Path, name: str) -> DictConfig:
    """A ``dense_clip`` run with ``cfg``'s feature options (and the global when needed)."""
    keys = set(retriever_schema("dense_clip").keys())
    retriever = {k: v for k, v in as_dict(cfg.retriever).items() if k in keys}
    retriever.update(name="dense_clip", with_global=need is not None, global_pass=need or "same")
    raw = OmegaConf.create(as_dict(cfg))
    raw.retriever = retriever
    raw.run.output_dir = str(out / "runs" / name)
    return validate(raw)


def _slug(cfg: DictConfig) -> str:
    backbone = str(cfg.retriever.backbone).replace("/", "-")
    return f"{backbone}-{cfg.retriever.resolution or 'native'}"


def share_extractions(runs: list[PlannedRun], out: Path) -> list[PlannedRun]:
    """Points every dense-family row at one extraction per feature setting (and global
    CLIP rows at an extraction's native-size global); returns the runs in order: those
    other runs read first, then the rest (table order)."""
    groups: dict[str, list[PlannedRun]] = {}
    for run in runs:
        key = _features_key(run.cfg)
        if key is not None:
            groups.setdefault(key, []).append(run)
    extractions: list[PlannedRun] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        passes = sorted({n for r in members if (n := _global_need(r.cfg)) is not None})
        needs: list[str | None] = [*passes] or [None]
        sources: dict[str | None, PlannedRun] = {}
        for need in needs:
            own = next(
                (
                    r
                    for r in members
                    if r.cfg.retriever.name == "dense_clip" and _global_need(r.cfg) == need
                ),
                None,
            )
            if own is None:
                name = f"_extract-{_slug(members[0].cfg)}-{len(extractions) + 1}"
                own = PlannedRun(name, _extraction_cfg(members[0].cfg, need, out, name), True)
            sources[need] = own
            extractions.append(own)
        for run in members:
            need = _global_need(run.cfg)
            source = sources.get(need, sources[needs[0]])
            if source is run:
                continue
            run.source = source.name
            run.cfg.store.dense_from = str(source.run_dir)
    everything = [*(e for e in extractions if e.hidden), *runs]
    share_globals(everything)
    read = {r.source for r in everything}
    first = [r for r in everything if r.name in read]  # before the runs reading them
    return first + [r for r in everything if r not in first]


def _global_key(cfg: DictConfig) -> str:
    """What fixes a native-size global CLIP embedding: the model and its weights (not the
    dense resolution: the global pass has its own view), with the data and the rest."""
    options = as_dict(cfg.retriever)
    return _shared_key(cfg, {k: options.get(k) for k in ("backbone", "pretrained", "cache_dir")})


def share_globals(runs: list[PlannedRun]) -> None:
    """Points each global CLIP row at its native size to a Dense-CLIP backbone run that
    keeps the same embedding (``with_global``, ``global_pass=native``): no pass of its own."""
    native = {
        _global_key(e.cfg): e
        for e in runs
        if e.uses_backbone
        and e.cfg.retriever.name == "dense_clip"
        and e.cfg.retriever.with_global
        and e.cfg.retriever.global_pass == "native"
    }
    for run in runs:
        cfg = run.cfg
        if cfg.retriever.name != "clip" or cfg.retriever.resolution or cfg.store.dense_from:
            continue
        source = native.get(_global_key(cfg))
        if source is not None:
            run.source = source.name
            cfg.store.dense_from = str(source.run_dir)


def run_status(run: PlannedRun) -> None:
    """Sets ``run.status``: ``done`` (results written with this config), ``changed``
    (results of another config), ``partial`` (shards but no results: resumed) or
    ``todo``."""
    metrics, stored = run.run_dir / "metrics.json", run.run_dir / "config.yaml"
    if metrics.is_file() and stored.is_file():
        try:
            diff = differences(_compared(load_stored_config(stored)), _compared(run.cfg))
        except RetrievalError as err:
            diff = [str(err)]
        weights = Path(str(run.cfg.retriever.get("pretrained")))
        if weights.is_file() and weights.stat().st_mtime > metrics.stat().st_mtime:
            diff.append(f"retriever.pretrained: {weights} changed after the results")
        run.status, run.detail = ("changed", "; ".join(diff)) if diff else ("done", "")
    elif (run.run_dir / "embeddings").is_dir():
        run.status, run.detail = "partial", "resumed from its shards"
    else:
        run.status, run.detail = "todo", ""


def _compared(cfg: DictConfig) -> dict[str, Any]:
    plain = as_dict(with_absolute_paths(cfg))
    for key in COSMETIC:
        section, _, last = key.rpartition(".")
        node = plain.get(section, {}) if section else plain
        node.pop(last, None)
    return plain


def plan_sweep(sweep: Sweep, prepare_data: bool = True) -> list[PlannedRun]:
    """The sweep's runs, configs validated, extractions shared, each with its status;
    with ``prepare_data``, the sweep's data step runs first (after the configs passed).

    Raises:
        ConfigError: an experiment's config is invalid (named with the experiment).
    """
    runs = [PlannedRun(e.name, experiment_config(sweep, e)) for e in sweep.experiments]
    if sweep.prepare and prepare_data:
        from retrieval.sweep.prepare import prepare

        prepare(sweep.prepare, [r.cfg for r in runs])
    planned = share_extractions(runs, sweep.out)
    for run in planned:
        run_status(run)
    return planned


def experiment_config(sweep: Sweep, experiment: Experiment) -> DictConfig:
    """One experiment's config with the sweep's overrides (and ``data.root``) applied."""
    try:
        cfg = load_config(experiment.config, sweep.run_overrides(experiment))
    except ConfigError as err:
        raise ConfigError(f"{sweep.path}: experiment {experiment.name!r}: {err}") from None
    datasets = {"coco", "lvis", "nuimages", "scenes"}
    tags = [t for t in cfg.logger.wandb.tags if t not in datasets or t == cfg.data.name]
    cfg.logger.wandb.tags = [*tags, f"sweep:{sweep.name}"]  # a row moved to another dataset
    if sweep.data_root:
        for key in ("annotations", "images", "shards"):
            value = cfg.data.get(key)
            if isinstance(value, str) and value.startswith("data/"):
                cfg.data[key] = str(Path(sweep.data_root) / value.removeprefix("data/"))
    return cfg

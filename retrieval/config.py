"""Run configuration: YAML config groups composed with ``defaults``, plus ``key=value``.

Layout (lightning-hydra-template's groups, without Hydra)::

    configs/dataset/coco.yaml        data: {...}
    configs/retriever/clip_rn50.yaml retriever: {...}
    configs/experiment/X.yaml        defaults: [dataset: coco, retriever: clip_rn50] + overrides

A group file holds full paths (``data:``, ``retriever:``), so every file reads the same
way as the resolved ``config.yaml`` of a run. On the command line, ``key=value`` sets a
key and ``group=name`` (``retriever=dense_clip_rn50x64``) swaps a group's file.

Every key is checked before any work starts: an unknown key fails naming the closest
valid one, a wrong type names the expected one. The ``retriever`` and ``data`` sections
are derived from the typed keyword arguments of the chosen retriever and dataset (see
``retrieval.registry``), so a plugin's options are config keys like the built-ins'.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from retrieval.errors import ConfigError, did_you_mean
from retrieval.registry import DATASETS, RETRIEVERS, Registry, keyword_parameters

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger("retrieval")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the wheel
GROUPS = {"dataset": "data", "retriever": "retriever"}


@dataclass
class TextConfig:
    prompts: str = "imagenet80"
    batch_size: int = 256


@dataclass
class ProtocolConfig:
    top_k: int = 50
    large_area: float = 96.0**2
    lvis_federated: bool = True


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"


@dataclass
class LoaderConfig:
    batch_size: int = 32
    num_workers: int = 2


@dataclass
class StoreConfig:
    dtype: str = "float16"
    shard_size: int = 1024
    shard_mb: float = 512.0
    dense_from: str | None = None


@dataclass
class ScoreConfig:
    max_memory_gb: float = 2.0
    device: str = "auto"


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "object-retrieval"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    resume: str = "auto"
    seed: int = 0
    progress: bool = True
    verify: str = "fast"  # stored shards checked on reuse: fast (size+mtime) or full (sha256)


@dataclass
class EvalConfig:
    data: Any = None
    retriever: Any = None
    text: TextConfig = field(default_factory=TextConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)


#: keys renamed since run folders were first written: old name -> new name
RENAMED_KEYS = {"retriever.checkpoint": "retriever.pretrained"}

CHOICES: dict[str, tuple[str, ...]] = {
    "text.prompts": ("imagenet80", "single"),
    "store.dtype": ("float16", "float32"),
    "logger.wandb.mode": ("offline", "online", "disabled"),
    "run.resume": ("auto", "never", "force"),
    "run.verify": ("fast", "full"),
}


def find_config(name: str | Path, group: str | None = None) -> Path:
    """Resolves a config path, or a name inside ``configs/`` (``experiment/x`` or ``x``)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    base = CONFIG_DIR / group if group else CONFIG_DIR
    for candidate in (base / f"{name}.yaml", CONFIG_DIR / "experiment" / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    folders = [base] if group else [base, CONFIG_DIR / "experiment"]  # what is searched
    known = sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})
    where = f"group {group!r}" if group else "configs/experiment/ or as a file path"
    hint = did_you_mean(str(path.stem), known)
    raise ConfigError(f"config {str(name)!r} not found in {where}.{hint} Known: {', '.join(known)}")


#: a config file's limits: its size, and its nodes once aliases are expanded (a YAML
#: "billion laughs" file is small but expands past any memory)
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand past
    :data:`MAX_CONFIG_NODES` nodes, or refer to themselves, before building anything."""

    def construct_document(self, node: yaml.Node) -> Any:
        sizes: dict[int, int] = {}
        open_nodes: set[int] = set()

        def size(n: yaml.Node) -> int:  # nodes after expansion; shared nodes counted once
            if id(n) in sizes:
                return sizes[id(n)]
            if id(n) in open_nodes:
                raise yaml.YAMLError("an alias refers to the node that contains it")
            open_nodes.add(id(n))
            total = 1
            if isinstance(n, yaml.SequenceNode):
                total += sum(size(child) for child in n.value)
            elif isinstance(n, yaml.MappingNode):
                total += sum(size(k) + size(v) for k, v in n.value)
            open_nodes.discard(id(n))
            if total > MAX_CONFIG_NODES:
                raise yaml.YAMLError(
                    f"more than {MAX_CONFIG_NODES} values once its aliases are expanded"
                )
            sizes[id(n)] = total
            return total

        size(node)
        return super().construct_document(node)


def read_yaml(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: {path.stat().st_size} bytes, over the {MAX_CONFIG_BYTES} a config "
                f"file may hold; is it a config?"
            )
        with path.open("rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
        content = yaml.load(text, Loader=_BoundedLoader) or {}  # _BoundedLoader is a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except (OSError, RecursionError) as err:
        raise ConfigError(f"{path}: cannot be read as a config: {err}") from None
    if not isinstance(content, dict):
        kind = type(content).__name__
        raise ConfigError(f"{path}: a config file must hold a mapping, got {kind}")
    return content


def _defaults(content: dict, path: Path) -> list[tuple[str, str]]:
    """Pops and parses a file's ``defaults`` list into ``(group, name)`` pairs."""
    entries = content.pop("defaults", []) or []
    pairs: list[tuple[str, str]] = []
    for entry in entries:
        if isinstance(entry, str) and "/" in entry:
            group, name = entry.split("/", 1)
            pairs.append((group, name))
        elif isinstance(entry, dict) and len(entry) == 1:
            pairs.append(next(iter(entry.items())))
        else:
            raise ConfigError(
                f"{path}: defaults entry {entry!r} must be 'group: name' or 'group/name'"
            )
    for group, _ in pairs:
        if group not in GROUPS and group != "experiment":
            raise ConfigError(f"{path}: unknown config group {group!r} in defaults")
    return pairs


def _merge(base: DictConfig, *others: Any) -> DictConfig:
    """``OmegaConf.merge`` onto a mapping, which returns a mapping (its stub: any container)."""
    return cast(DictConfig, OmegaConf.merge(base, *others))


def _compose(path: Path, choices: dict[str, str], seen: tuple[Path, ...] = ()) -> DictConfig:
    """Merges a file's defaults (group choices overridden by ``choices``), then the file."""
    if path in seen:
        raise ConfigError(f"{path}: defaults form a cycle through {[str(p) for p in seen]}")
    content = read_yaml(path)
    pairs = dict(_defaults(content, path))
    pairs.update(choices)
    merged = OmegaConf.create()
    for group, name in pairs.items():
        merged = _merge(merged, _compose(find_config(name, group), {}, (*seen, path)))
    return _merge(merged, OmegaConf.create(content))


def _split_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    choices, dotlist = {}, []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        if key in GROUPS:
            choices[key] = value
        else:
            dotlist.append(item)
    return choices, dotlist


def _unknown_keys(cfg: Any, schema: Any, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys of ``cfg`` absent from ``schema`` (dotted), each with the valid keys beside it."""
    problems: list[tuple[str, list[str]]] = []
    if not isinstance(cfg, DictConfig) or not isinstance(schema, DictConfig):
        return problems
    if OmegaConf.get_type(schema) is dict:  # a free-form mapping accepts any key
        return problems
    for key in cfg:
        dotted = f"{prefix}{key!s}"
        if key not in schema:
            problems.append((dotted, [f"{prefix}{k!s}" for k in schema]))
        else:
            problems += _unknown_keys(cfg._get_node(key), schema._get_node(key), f"{dotted}.")
    return problems


def _annotation(hint: Any) -> Any:
    """Maps a factory's type hint to one omegaconf can validate (else ``Any``)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        return type(args[0])
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and type(None) in args:
            return _annotation(rest[0]) | None
        return Any
    if hint in (str, int, float, bool) or dataclasses.is_dataclass(hint):
        return hint
    if origin in (list, tuple) or hint in (list, tuple):
        return list[Any]
    if origin is dict or hint is dict:
        return dict[str, Any]
    return Any


def _constant(value: Any) -> Callable[[], Any]:
    """A ``default_factory`` that returns ``value`` itself."""
    return lambda: value


def options_schema(
    registry: Registry[Any], name: str, skip: Collection[str] = (), required_default: Any = MISSING
) -> DictConfig:
    """A structured config of the keyword arguments the factory ``name`` accepts.

    Args:
        registry: where ``name`` is registered.
        skip: arguments supplied by the code, not the config (a dataset's ``transform``).
        required_default: the value of an argument without a default (``MISSING``: the
            config must set it; ``None``: checked when the component is built, so a
            config can leave data paths to the command line).
    """
    factory = registry.get(name)
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = typing.get_type_hints(target)
    fields: list[tuple[str, Any, Any]] = [("name", str, field(default=name))]
    for key, param in keyword_parameters(factory).items():
        if key in skip:
            continue
        value = param.default
        if value is inspect.Parameter.empty:
            value = required_default
        annotation = _annotation(hints.get(key, Any))
        if value is MISSING:
            fields.append((key, annotation, MISSING))
            continue
        if value is None and annotation is not Any:
            annotation = typing.Optional[annotation]  # noqa: UP045 - also wraps generics
        if isinstance(value, (list, dict)) or dataclasses.is_dataclass(value):
            default = field(default_factory=_constant(value))
        else:
            default = field(default=value)
        fields.append((key, annotation, default))
    schema = dataclasses.make_dataclass(f"{name}_options", fields)
    return OmegaConf.structured(schema)


def literal_choices(registry: Registry[Any], name: str) -> dict[str, tuple[Any, ...]]:
    """The options of ``name`` typed ``Literal[...]``, with their allowed values."""
    factory = registry.get(name)
    target = factory.__init__ if inspect.isclass(factory) else factory
    choices = {}
    for key, hint in typing.get_type_hints(target).items():
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is typing.Literal:
            choices[key] = typing.get_args(hint)
        elif len(rest) == 1 and typing.get_origin(rest[0]) is typing.Literal:
            choices[key] = (*typing.get_args(rest[0]), None)
    return choices


def config_options(name: str) -> dict[str, str]:
    """The dataset's arguments filled from other config sections: argument -> config key.

    A dataset declares them (LVIS: ``CONFIG_OPTIONS = {"federated":
    "protocol.lvis_federated"}``) so that the protocol keeps its own config section and
    no dataset is special-cased.
    """
    return dict(getattr(DATASETS.get(name), "CONFIG_OPTIONS", {}))


def retriever_schema(name: str) -> DictConfig:
    """The ``retriever.*`` schema of retriever ``name`` (its typed keyword arguments)."""
    return options_schema(RETRIEVERS, name)


def data_schema(name: str) -> DictConfig:
    """The ``data.*`` schema of dataset ``name``: its typed keyword arguments, less the
    transform (the retriever's) and the arguments it takes from other sections."""
    return options_schema(
        DATASETS, name, skip={"transform", *config_options(name)}, required_default=None
    )


def _check_choices(cfg: DictConfig) -> None:
    allowed_values = dict(CHOICES)
    for section, registry in (("retriever", RETRIEVERS), ("data", DATASETS)):
        for key, allowed in literal_choices(registry, str(cfg[section].name)).items():
            allowed_values[f"{section}.{key}"] = allowed
    for key, allowed in allowed_values.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            names = ", ".join(str(a) for a in allowed)
            raise ConfigError(f"{key}={value!r} is not one of {names}")


# -- value bounds: checked with the config, before any model or data is built ----------

#: integer keys and the least value each may take
MINIMUMS: dict[str, int] = {
    "protocol.top_k": 1,
    "loader.batch_size": 1,
    "loader.num_workers": 0,
    "store.shard_size": 1,
    "text.batch_size": 1,
}
#: the largest any integer key may be: past it, counts and sizes overflow 32-bit kernels
LARGEST_INT = 2**31 - 1
#: ``trainer.precision`` values Lightning accepts (written as strings in a config)
PRECISIONS = (
    "64-true", "64", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16",
    "16-true", "bf16-true", "transformer-engine", "transformer-engine-float16",
)  # fmt: skip
#: image sides a retriever may be asked to embed at (``retriever.resolution``)
RESOLUTION_RANGE = (32, 4096)


def _check_values(cfg: DictConfig) -> None:
    """Refuses values that pass the type check but cannot work (a zero batch,
    a 30000-pixel resolution), naming the key and the fix."""
    for key, least in MINIMUMS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value < least:
            raise ConfigError(f"{key}={value!r} must be at least {least}")
        if value is not None and value > LARGEST_INT:
            raise ConfigError(f"{key}={value!r} must be at most {LARGEST_INT}")
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision!r} is not one of {', '.join(PRECISIONS)}"
            f".{did_you_mean(precision, PRECISIONS)} (32-true: full precision on any device)"
        )
    memory = cfg.score.max_memory_gb
    if not memory > 0 or memory == float("inf"):  # also NaN
        raise ConfigError(f"score.max_memory_gb={memory!r} must be a positive number (e.g. 2)")
    devices = cfg.trainer.devices
    if isinstance(devices, bool) or (isinstance(devices, int) and (devices == 0 or devices < -1)):
        raise ConfigError(
            f"trainer.devices={devices!r}: use a positive count, -1 (every device) or auto"
        )
    low, high = RESOLUTION_RANGE
    resolution = cfg.retriever.get("resolution")
    if isinstance(resolution, int) and not low <= resolution <= high:
        raise ConfigError(
            f"retriever.resolution={resolution} is outside {low}..{high} pixels; "
            f"leave it unset for the model's own size"
        )


def _check_machine(cfg: DictConfig) -> None:
    """Refuses device settings this machine cannot honour (checked for a run about to
    start, not for a stored config read elsewhere, e.g. by a CPU-only search)."""
    from retrieval.devices import check_accelerator, check_device

    check_device(cfg.score.device, "score.device")
    check_accelerator(cfg.trainer.accelerator)


def _section(raw: DictConfig, section: str, default_name: str | None) -> str:
    node = raw.get(section)
    if isinstance(node, DictConfig) and "name" in node:
        try:
            return str(node.name)
        except OmegaConfBaseException as err:  # an interpolation to a missing key
            message = str(getattr(err, "msg", err)).splitlines()[0]
            raise ConfigError(f"config key '{section}.name': {message}") from None
    if default_name is None:
        raise ConfigError(f"{section}.name is missing: pick one from `retrieval list`")
    return default_name


def _check_sections(raw: DictConfig) -> None:
    """``retriever`` and ``data`` must be mappings (``data=[]`` or ``data=null`` are not)."""
    for section in ("retriever", "data"):
        try:
            node = raw.get(section)
        except OmegaConfBaseException as err:
            raise ConfigError(f"config key {section!r}: {getattr(err, 'msg', err)}") from None
        if section in raw and not isinstance(node, DictConfig):
            raise ConfigError(
                f"config key {section!r} must be a mapping of {section}.* keys (e.g. "
                f"{section}.name=...), got {node!r}"
            )


def validate(raw: DictConfig) -> DictConfig:
    """Checks a composed config (keys, types, choices, values); returns it typed."""
    _check_sections(raw)
    schemas = {
        "retriever": retriever_schema(_section(raw, "retriever", None)),
        "data": data_schema(_section(raw, "data", "coco")),
    }
    problems = [
        p
        for p in _unknown_keys(raw, OmegaConf.structured(EvalConfig))
        if p[0].split(".")[0] not in schemas
    ]
    for section, section_schema in schemas.items():
        problems += _unknown_keys(raw.get(section), section_schema, f"{section}.")
    if problems:
        key, valid = problems[0]
        hint = (
            f" Did you mean {RENAMED_KEYS[key]!r}? (renamed)"
            if key in RENAMED_KEYS
            else did_you_mean(key, valid, cutoff=0.5)
        )
        raise ConfigError(
            f"unknown config key {key!r}.{hint} Valid keys here: {', '.join(sorted(valid))}"
        )
    try:
        schema = OmegaConf.structured(EvalConfig)
        for section, section_schema in schemas.items():
            schema[section] = section_schema
        cfg = _merge(schema, raw)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "?"
        message = getattr(err, "msg", str(err))
        raise ConfigError(f"config key {key!r}: {message}") from None
    _check_choices(cfg)
    _check_values(cfg)
    retriever_options(cfg)  # runs the option dataclasses' own checks before any work
    return with_absolute_paths(cfg)


def retriever_options(cfg: DictConfig) -> dict[str, Any]:
    """The retriever's keyword arguments, nested option groups as their dataclasses.

    Raises:
        ConfigError: an option group rejects its values (its message names the key).
    """
    try:
        # cfg.retriever is structured (retriever_schema), so this is its dataclass.
        options = cast("DataclassInstance", OmegaConf.to_object(cfg.retriever))
    except (ValueError, TypeError, OmegaConfBaseException) as err:
        raise ConfigError(f"retriever: {err}") from None
    return {
        f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name != "name"
    }


def dataset_options(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """The dataset's name and keyword arguments: ``data.*`` (paths as :func:`validate`
    resolved them) plus the arguments it takes from other sections (:func:`config_options`).

    Required arguments are checked here, when the dataset is about to be built, not by
    :func:`validate`: a config may leave its data paths to the command line.

    Raises:
        ConfigError: an argument the dataset requires is not set.
    """
    options = as_dict(cfg.data)
    name = str(options.pop("name"))
    required = [
        key
        for key, param in DATASETS.parameters(name).items()
        if param.default is param.empty and key != "transform"
    ]
    for key in required:
        if options.get(key) in (None, ""):
            raise ConfigError(
                f"data.{key} is not set: pass data.{key}=PATH on the command line "
                f"(see `retrieval data check` and the README's dataset section)"
            )
    for argument, key in config_options(name).items():
        options[argument] = OmegaConf.select(cfg, key)
    return name, options


def _with_overrides(raw: DictConfig, dotlist: list[str]) -> DictConfig:
    """``raw`` with the ``key=value`` overrides merged in.

    Raises:
        ConfigError: an override omegaconf cannot parse or merge (TypeError: a value merged
            onto a section of another kind, ``data=[]``; IndexError/ValueError: a key
            omegaconf's key-path parser trips on, ``[=0``).
    """
    try:
        return _merge(raw, OmegaConf.from_dotlist(dotlist))
    except (OmegaConfBaseException, yaml.YAMLError, TypeError, IndexError, ValueError) as err:
        why = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(
            f"bad override ({why}) in {' '.join(dotlist)}: write key=value, e.g. "
            f"retriever.aggregate.k=20"
        ) from None


def load_config(config: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Composes, overrides and validates a run config (nothing runs before this passes)."""
    choices, dotlist = _split_overrides(list(overrides or []))
    raw = _with_overrides(_compose(find_config(config), choices), dotlist)
    cfg = validate(raw)
    _check_machine(cfg)
    return cfg


def output_dir_of(config: str | Path, overrides: list[str] | None = None) -> Path | None:
    """``run.output_dir`` as :func:`load_config` will set it, read from the composed
    files and overrides without validating them (validation imports every retriever):
    for checks that must come first. None when it cannot be read that way."""
    try:
        choices, dotlist = _split_overrides(list(overrides or []))
        raw = _with_overrides(_compose(find_config(config), choices), dotlist)
        value = OmegaConf.select(raw, "run.output_dir", default=RunConfig.output_dir)
    except (ConfigError, OmegaConfBaseException, yaml.YAMLError, TypeError, ValueError):
        return None
    return Path(str(value)) if value else None


def load_stored_config(path: str | Path) -> DictConfig:
    """A run's stored ``config.yaml`` (a run folder's or an index's), readable across
    versions: renamed keys (:data:`RENAMED_KEYS`) take their new names, and keys this
    version no longer knows are dropped with a warning (nothing reads them any more).

    Raises:
        ConfigError: the file is not a config, or a value no longer validates (the
            message names the file: re-run the run to refresh it).
    """
    path = Path(path)
    raw = OmegaConf.create(read_yaml(path))
    for old, new in RENAMED_KEYS.items():
        value = OmegaConf.select(raw, old, default=MISSING)
        if value is not MISSING:
            section, old_key = old.rsplit(".", 1)
            OmegaConf.update(raw, new, value, force_add=True)
            raw[section].pop(old_key)
    retriever, data = raw.get("retriever"), raw.get("data")
    unknown = _unknown_keys(raw, OmegaConf.structured(EvalConfig))
    if isinstance(retriever, DictConfig) and "name" in retriever:
        unknown = [u for u in unknown if not u[0].startswith("retriever.")]
        unknown += _unknown_keys(retriever, retriever_schema(str(retriever.name)), "retriever.")
    if isinstance(data, DictConfig):
        unknown = [u for u in unknown if not u[0].startswith("data.")]
        unknown += _unknown_keys(data, data_schema(str(data.get("name", "coco"))), "data.")
    for key, _ in unknown:
        log.warning("%s: config key %r is no longer used; ignored", path, key)
        section, _, last = key.rpartition(".")
        node = OmegaConf.select(raw, section) if section else raw
        node.pop(last)
    try:
        return validate(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err} (written by another version? re-run that run)") from None


def with_absolute_paths(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` whose ``data.*`` values naming an existing file or folder are
    absolute (symlinks resolved). The one place data paths are resolved: :func:`validate`
    applies it, so every phase (eval, embed, index build, the data fingerprint, a run's
    stored ``config.yaml``) sees ``./x`` and ``/abs/x`` alike, from any working directory.
    Idempotent."""
    out = cfg.copy()
    for key, value in (cfg.data or {}).items():
        if key != "name" and isinstance(value, str) and value and Path(value).exists():
            out.data[key] = str(Path(value).resolve())
    return out


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what a run folder's ``config.yaml`` holds)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_run_config(cfg: DictConfig, run_dir: str | Path) -> None:
    """Writes the run folder's ``config.yaml`` (resolved, data paths absolute), whole or
    not at all: what :func:`load_stored_config` reads back."""
    from retrieval.store.run_folder import RunFolder

    RunFolder(Path(run_dir)).write_config(to_yaml(with_absolute_paths(cfg)))


def as_dict(node: Any) -> Any:
    """A plain, resolved Python container of a config node."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node

"""The one name -> factory registry (timm's ``register_model`` pattern) and its four
instances: retrievers, datasets, aggregators and index backends.

Each registry imports its built-in modules on first lookup (their decorators register
them) and loads its entry-point group, so a separately installed package adds any of
the four kinds without editing this one::

    [project.entry-points."retrieval.retrievers"]      # or .datasets, .aggregators,
    my_retriever = "my_package.module:MyRetriever"      #    .index_backends

A factory's typed keyword arguments are its options: the config keys of
``retriever.*`` and ``data.*``, the keyword arguments of ``create_aggregator``.

This module imports nothing of the package but its errors (the bottom of the core's
layers, pyproject.toml): each kind's ``register_*`` / ``list_*`` / ``create_*`` live
beside its base class (``retrievers/base.py``, ``data/base.py``, ``aggregate/base.py``,
``index/base.py``), so a component's module imports only its own base.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from retrieval.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from retrieval.aggregate.base import Aggregator
    from retrieval.data.base import ImageDataset
    from retrieval.index.engine import Engine
    from retrieval.retrievers.base import Retriever

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def keyword_parameters(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The keyword arguments a class or function accepts (its options)."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters
    return {
        k: p
        for k, p in params.items()
        if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


class Registry(Generic[T]):
    """Factories of one kind of component ``T``, looked up by name.

    Args:
        kind: what is registered ("retriever"), for messages.
        config_key: the config key or flag that names one ("retriever.name").
        builtin: modules imported on first lookup; their decorators register them. One
            that fails to import is an error naming it.
        entry_point_group: where separately installed packages declare theirs.
    """

    def __init__(
        self,
        kind: str,
        config_key: str,
        builtin: tuple[str, ...] = (),
        entry_point_group: str | None = None,
    ) -> None:
        self.kind = kind
        self.config_key = config_key
        self.builtin = builtin
        self.entry_point_group = entry_point_group
        self.factories: dict[str, Callable[..., T]] = {}
        self.defaults: dict[str, dict[str, Any]] = {}
        self.builtin_loaded = False
        self.entry_points_loaded = False

    def register(self, name: str, **defaults: Any) -> Callable[[F], F]:
        """Decorator registering a class or factory under ``name``; ``defaults`` are
        options passed to it unless given (one class can serve several names)."""

        def wrap(factory: F) -> F:
            existing = self.factories.get(name)
            if existing is not None and existing is not factory:
                raise ValueError(f"{self.kind} {name!r} is already registered by {existing!r}")
            self.factories[name] = factory
            self.defaults[name] = defaults
            return factory

        return wrap

    def _load(self) -> None:
        if not self.builtin_loaded:
            self.builtin_loaded = True
            for module in self.builtin:
                try:
                    importlib.import_module(module)
                except Exception as err:
                    self.builtin_loaded = False
                    raise ImportError(
                        f"built-in {self.kind} module {module} failed to import: {err}"
                    ) from err
        if self.entry_point_group and not self.entry_points_loaded:
            self.entry_points_loaded = True
            for ep in importlib.metadata.entry_points(group=self.entry_point_group):
                if ep.name not in self.factories:
                    self._load_entry_point(ep)

    def _load_entry_point(self, ep: importlib.metadata.EntryPoint) -> None:
        try:
            target = ep.load()
        except Exception as err:  # a broken plugin must name itself, not break silently
            raise ImportError(
                f"{self.kind} plugin {ep.name!r} ({ep.value}) failed to import: {err}. Fix "
                f"or uninstall the package declaring it in {self.entry_point_group!r}."
            ) from err
        if ep.name not in self.factories and callable(target):
            self.factories[ep.name] = target
            self.defaults[ep.name] = {}

    def names(self) -> list[str]:
        """Every registered name, built-in and from plugins, sorted."""
        self._load()
        return sorted(self.factories)

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``.

        Raises:
            ConfigError: no such name (the message names the closest and all known).
        """
        self._load()
        try:
            return self.factories[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r} ({self.config_key})."
                f"{did_you_mean(name, self.factories)} Registered: {', '.join(self.names())}."
            ) from None

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """The factory's keyword arguments: the options ``name`` accepts."""
        return keyword_parameters(self.get(name))

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Builds ``name`` with its registered defaults under ``kwargs``; an unknown
        option fails naming the closest valid one."""
        factory = self.get(name)
        params = keyword_parameters(factory)
        takes_any = any(
            p.kind is p.VAR_KEYWORD
            for p in inspect.signature(
                factory.__init__ if inspect.isclass(factory) else factory
            ).parameters.values()
        )
        for key in kwargs:
            if key not in params and not takes_any:
                raise ConfigError(
                    f"{self.kind} {name!r} has no option {key!r}.{did_you_mean(key, params)} "
                    f"Options: {', '.join(params)}."
                )
        return factory(*args, **{**self.defaults.get(name, {}), **kwargs})


RETRIEVERS: Registry[Retriever] = Registry(
    "retriever",
    "retriever.name",
    builtin=tuple(
        f"retrieval.retrievers.{m}" for m in ("clip", "dense_clip", "cluster_clip", "owlvit")
    ),
    entry_point_group="retrieval.retrievers",
)
DATASETS: Registry[ImageDataset] = Registry(
    "dataset",
    "data.name",
    builtin=tuple(
        f"retrieval.data.{m}"
        for m in ("coco", "lvis", "nuimages", "folder", "listfile", "webdataset")
    ),
    entry_point_group="retrieval.datasets",
)
AGGREGATORS: Registry[Aggregator] = Registry(
    "aggregator",
    "retriever.aggregate.method",
    builtin=tuple(f"retrieval.aggregate.{m}" for m in ("base", "kmeans", "agglomerative", "prune")),
    entry_point_group="retrieval.aggregators",
)
INDEX_BACKENDS: Registry[Engine] = Registry(
    "index backend",
    "--backend",
    builtin=tuple(
        f"retrieval.index.{m}"
        for m in ("exact", "faiss_backend", "lancedb_backend", "milvus_backend")
    ),
    entry_point_group="retrieval.index_backends",
)
REGISTRIES: tuple[Registry[Any], ...] = (RETRIEVERS, DATASETS, AGGREGATORS, INDEX_BACKENDS)

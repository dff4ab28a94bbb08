"""A name -> factory registry (timm's ``register_model`` pattern), shared by retrievers,
datasets and aggregators: decorator registration, lazy import of the built-in modules,
an optional entry-point group for plugins, and did-you-mean errors."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def keyword_parameters(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The keyword arguments a class or function accepts (its config keys)."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters
    return {
        k: p
        for k, p in params.items()
        if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def did_you_mean(key: str, options: Any) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry:
    """Factories of one kind of component, looked up by name.

    Args:
        kind: what is registered ("retriever"), for messages.
        config_key: the config key that names one ("retriever.name").
        builtin: modules imported on first lookup; their decorators register them. A
            module not written yet is skipped; one that fails to import is an error.
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
        self.factories: dict[str, Callable[..., Any]] = {}
        self.entry_points_loaded = False

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering a class or factory under ``name``."""

        def wrap(factory: F) -> F:
            existing = self.factories.get(name)
            if existing is not None and existing is not factory:
                raise ValueError(f"{self.kind} {name!r} is already registered by {existing!r}")
            self.factories[name] = factory
            return factory

        return wrap

    def _load(self) -> None:
        for module in self.builtin:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name != module:
                    raise
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

    def names(self) -> list[str]:
        self._load()
        return sorted(self.factories)

    def get(self, name: str) -> Callable[..., Any]:
        self._load()
        try:
            return self.factories[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r} (config {self.config_key})."
                f"{did_you_mean(name, self.factories)} Registered: {', '.join(self.names())}."
            ) from None

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        return keyword_parameters(self.get(name))

    def create(self, name: str, **kwargs: Any) -> Any:
        """Builds ``name``; an unknown option fails naming the closest valid one."""
        params = self.parameters(name)
        for key in kwargs:
            if key not in params:
                raise TypeError(
                    f"{self.kind} {name!r} has no option {key!r}.{did_you_mean(key, params)} "
                    f"Options: {', '.join(params)}."
                )
        return self.get(name)(**kwargs)

"""Named factories for pluggable parts, filled explicitly or from entry points.

Adding a backend or an adapter means registering a name (in code or in a package's
``pyproject.toml``); no dispatch code changes. Entry points are read on first lookup,
never at import.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from core.config import did_you_mean
from core.errors import ConfigError

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """A mapping from names to factories of one kind (memory backends, adapters, ...)."""

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._factories: dict[str, F] = {}
        self._loaded_entry_points = False

    def register(self, name: str, factory: F) -> None:
        """Add ``factory`` under ``name``; a name can be registered once."""
        if name in self._factories and self._factories[name] is not factory:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._factories[name] = factory

    def names(self) -> list[str]:
        """All known names, entry points included, sorted."""
        self._load_entry_points()
        return sorted(self._factories)

    def get(self, name: str, *, where: str = "") -> F:
        """The factory for ``name``; a ``ConfigError`` naming the choices if unknown."""
        self._load_entry_points()
        try:
            return self._factories[name]
        except KeyError:
            prefix = f"{where}: " if where else ""
            choices = ", ".join(repr(n) for n in sorted(self._factories)) or "none"
            hint = did_you_mean(name, self._factories)
            raise ConfigError(
                f"{prefix}unknown {self.kind} {name!r}{hint} (known: {choices})"
            ) from None

    def _load_entry_points(self) -> None:
        if self._loaded_entry_points or self.group is None:
            return
        self._loaded_entry_points = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._factories:
                self._factories[ep.name] = _LazyFactory(ep.load)  # type: ignore[assignment]


class _LazyFactory:
    """Imports an entry point's target only when the factory is first called."""

    def __init__(self, load: Callable[[], object]) -> None:
        self._load = load
        self._target: Callable[..., object] | None = None

    def __call__(self, *args: object, **kwargs: object) -> object:
        if self._target is None:
            target = self._load()
            if not callable(target):
                raise TypeError(f"entry point {target!r} is not callable")
            self._target = target
        return self._target(*args, **kwargs)

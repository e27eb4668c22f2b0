"""Finding, configuring and setting up plugins for a bot.

``[plugins] modules`` names each plugin as a dotted module path (``plugins.faq``) or a
file or package path relative to the bot's TOML file (``hours.py``, ``./myplugin``),
which works without touching ``PYTHONPATH``. Every ``parley.plugins`` entry point not in
``disable`` is loaded too. A plugin's name is its module's ``NAME``, else the last part
of its path (``faq``), or the entry point's name; its settings are ``[plugins.NAME]``.

Any problem stops start-up with a :class:`ConfigError` naming the file, the plugin and
the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from core.config import PluginsSection, validate_section
from core.errors import ConfigError
from core.plugins import PluginRegistry

log = logging.getLogger(__name__)


def load_plugins(registry: PluginRegistry, section: PluginsSection, *, source: str) -> list[str]:
    """Set up every plugin ``section`` asks for (entry points first); returns their names."""
    tables = section.tables
    loaded: list[str] = []
    for ep in entry_points(group="parley.plugins"):
        if ep.name in section.disable:
            continue
        try:
            target = ep.load()
        except Exception as exc:
            raise ConfigError(f"{source}: plugins.{ep.name}: cannot load entry point "
                              f"{ep.value!r}: {type(exc).__name__}: {exc}") from None
        setup_plugin(registry, ep.name, target, tables.get(ep.name), source)
        loaded.append(ep.name)
    base_dir = registry.services.base_dir
    for spec in section.modules:
        module = import_plugin(spec, base_dir, source)
        name = str(getattr(module, "NAME", "") or _default_name(spec))
        if name in loaded:
            raise ConfigError(f"{source}: plugins.modules: two plugins are named {name!r}")
        if name in section.disable:
            continue
        setup_plugin(registry, name, module, tables.get(name), source)
        loaded.append(name)
    for name in tables:
        if name not in loaded:
            raise ConfigError(f"{source}: plugins.{name}: no plugin named {name!r} is loaded "
                              f"(loaded: {', '.join(loaded) or 'none'})")
    return loaded


def import_plugin(spec: str, base_dir: Path, source: str) -> ModuleType:
    """The module ``spec`` names: a path (relative to ``base_dir``) or a dotted name,
    tried as an import first and then as ``a/b.py`` or ``a/b/`` under ``base_dir``."""
    where = f"{source}: plugins.modules: {spec!r}"
    looks_like_path = "/" in spec or spec.endswith(".py") or spec.startswith(".")
    if not looks_like_path:
        try:
            return importlib.import_module(spec)
        except ModuleNotFoundError as exc:
            # Only "this very module is missing" falls through to the bot's folder; a
            # module that exists but fails to import is that module's error.
            if exc.name is None or not spec.startswith(exc.name):
                raise ConfigError(f"{where}: cannot import: {exc}") from None
        except Exception as exc:
            raise ConfigError(f"{where}: cannot import: {type(exc).__name__}: {exc}") from None
        relative = Path(*spec.split("."))
        candidates = [base_dir / relative.with_suffix(".py"), base_dir / relative]
    else:
        path = Path(spec).expanduser()
        candidates = [path if path.is_absolute() else base_dir / path]
    for candidate in candidates:
        if candidate.is_file() or (candidate / "__init__.py").is_file():
            return _import_path(candidate, spec.removesuffix(".py").replace("/", "."), where)
    raise ConfigError(f"{where}: no such module (looked in the import path and for "
                      f"{', '.join(str(c) for c in candidates)})")


def _import_path(path: Path, dotted: str, where: str) -> ModuleType:
    # A unique module name per file, so two bots' "plugin.py" files don't collide.
    name = "parley_plugin_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    if path.is_dir():
        spec = importlib.util.spec_from_file_location(
            name, path / "__init__.py", submodule_search_locations=[str(path)])
    else:
        spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where}: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"{where}: cannot import {path}: {type(exc).__name__}: {exc}") from None
    return module


def setup_plugin(registry: PluginRegistry, name: str, target: object,
                 table: Mapping[str, Any] | None, source: str) -> None:
    """Validate ``[plugins.NAME]`` against the plugin's ``Config`` and call its setup."""
    where = f"{source}: plugins.{name}"
    setup = getattr(target, "setup", target if callable(target) else None)
    if not callable(setup):
        raise ConfigError(f"{where}: the plugin has no setup(registry, config) function")
    model = getattr(target, "Config", None)
    config: BaseModel | None = None
    if isinstance(model, type) and issubclass(model, BaseModel):
        config = validate_section(model, table or {}, source=source, prefix=f"plugins.{name}")
    elif table:
        raise ConfigError(f"{where}: this plugin takes no settings (it has no Config model)")
    handle = registry.plugin(name)
    try:
        if len(inspect.signature(setup).parameters) >= 2:
            setup(handle, config)
        else:
            setup(handle)
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(source) else f"{source}: {text}") from None
    except Exception as exc:
        raise ConfigError(f"{where}: setup failed: {type(exc).__name__}: {exc}") from exc
    log.info("loaded plugin %s", name)


def _default_name(spec: str) -> str:
    last = spec.rstrip("/").removesuffix(".py").replace("/", ".").split(".")[-1]
    return last or spec

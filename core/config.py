"""Bot configuration: one TOML file per bot, validated once at start into typed settings.

Secrets never live in the file: a string value ``"${DISCORD_TOKEN}"`` is replaced by the
environment variable of that name when the file is loaded. Every error names the file,
the key and what was expected.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import ConfigError

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BotSection(Section):
    """``[bot]``: who the bot is."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    persona: str = "You are a helpful assistant."
    max_message_chars: int = Field(default=4000, ge=1, le=100_000)


class GenerationSection(Section):
    """``[generation]``: which generator answers, and how it samples."""

    backend: str = "local"
    model: str = "smollm2-135m"
    max_new_tokens: int = Field(default=128, ge=1, le=8192)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    device: str = "auto"
    context_tokens: int | None = Field(default=None, ge=64)
    cache_dir: str | None = None
    timeout: float = Field(default=120.0, gt=0.0)
    # Remote backends: ``redis`` (a fleet of ``parley worker``s) and ``openai`` (any
    # OpenAI-compatible server). ``url`` is the Redis URL or the server's base URL.
    url: str | None = None
    api_key: str | None = None
    queue: str = Field(default="parley:gen", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")


class WorkerSection(Section):
    """``[worker]``: how ``parley worker`` serves generation jobs from Redis and HTTP."""

    url: str = "redis://127.0.0.1:6379/0"
    name: str | None = None  # consumer name; default: host name and process id
    concurrency: int = Field(default=32, ge=1, le=4096)
    claim_idle: float = Field(default=15.0, gt=0.0)  # seconds before a silent job is reclaimed
    heartbeat: float = Field(default=3.0, gt=0.0)
    max_attempts: int = Field(default=3, ge=1)
    http_host: str = "127.0.0.1"
    http_port: int | None = Field(default=None, ge=0, le=65535)  # OpenAI-compatible API


class MemorySection(Section):
    """``[memory]``: where conversations are kept."""

    backend: str = "embedded"
    url: str = "redis://127.0.0.1:6379/0"
    window: int = Field(default=20, ge=1, le=1000)
    ttl: int = Field(default=7 * 24 * 3600, ge=1)
    key_prefix: str = Field(default="parley", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    timeout: float = Field(default=2.0, gt=0.0)


class ModerationSection(Section):
    """``[moderation]``: input checks and output guard (a pass-through for now)."""

    backend: str = "passthrough"


class PluginsSection(Section):
    """``[plugins]``: extra plugins by module path, plus entry-point plugins to skip."""

    modules: list[str] = []
    disable: list[str] = []


class BotSettings(Section):
    """A whole bot: the validated contents of one TOML file."""

    bot: BotSection
    generation: GenerationSection = GenerationSection()
    memory: MemorySection = MemorySection()
    moderation: ModerationSection = ModerationSection()
    plugins: PluginsSection = PluginsSection()
    worker: WorkerSection = WorkerSection()
    # Each adapter validates its own slice (see ``validate_section``).
    adapters: dict[str, dict[str, Any]] = {}
    source: str = "<memory>"


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> BotSettings:
    """Read, interpolate and validate the bot file at ``path``."""
    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return parse_settings(raw, source=str(file), env=env)


def parse_settings(
    raw: Mapping[str, Any], *, source: str = "<memory>", env: Mapping[str, str] | None = None
) -> BotSettings:
    """Validate an already-parsed mapping (for tests and embedding)."""
    data = _interpolate(dict(raw), source, env if env is not None else os.environ, ())
    data["source"] = source
    return validate_section(BotSettings, data, source=source)


def validate_section(
    model: type[M], data: Mapping[str, Any], *, source: str, prefix: str = ""
) -> M:
    """Validate ``data`` against ``model``; errors name ``source`` and the dotted key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(part for part in (prefix, *map(str, err["loc"])) if part)
            problems.append(f"{source}: {key or '<top>'}: {_describe(err)}")
        raise ConfigError("\n".join(problems)) from None


def _describe(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return f"{err.get('msg', 'invalid value')} (got {shown})"


def _interpolate(value: Any, source: str, env: Mapping[str, str], path: tuple[str, ...]) -> Any:
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                key = ".".join(path)
                raise ConfigError(
                    f"{source}: {key}: environment variable {name} is not set "
                    f"(the file refers to it as ${{{name}}})"
                )
            return env[name]

        return _ENV_REF.sub(lookup, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, source, env, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, source, env, (*path, str(i))) for i, v in enumerate(value)]
    return value


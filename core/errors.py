"""Exceptions that cross the boundaries between Parley's parts."""

from __future__ import annotations


class ParleyError(Exception):
    """Base class of Parley's own errors."""


class ConfigError(ParleyError):
    """A bot's configuration is wrong; the message names the file and the key."""


class InvalidMessage(ParleyError):
    """A message was refused before it reached the pipeline (empty, too long, bad bytes)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MemoryUnavailable(ParleyError):
    """The memory store could not read or write; nothing was stored half-way."""


class GenerationError(ParleyError):
    """The generator failed to produce a reply."""


class GeneratorBusy(GenerationError):
    """The generator cannot serve the request in time (queue full or deadline passed)."""

"""The lifecycle every long-lived part shares: idempotent start/stop, usable as ``async with``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Protocol, Self, runtime_checkable


@runtime_checkable
class Service(Protocol):
    """Something that holds resources between ``start()`` and ``stop()``."""

    async def start(self) -> None:
        """Acquire resources; calling it again while started does nothing."""

    async def stop(self) -> None:
        """Release resources; calling it again while stopped does nothing."""


class ServiceBase:
    """Gives a class idempotent ``start``/``stop`` and ``async with`` from two hooks.

    Subclasses implement ``_start`` and ``_stop``. If ``_start`` raises, ``_stop`` runs so
    that a failed start leaves nothing behind; ``_stop`` must therefore cope with a
    half-started object.
    """

    _started: bool = False

    async def _start(self) -> None:
        """Acquire resources (override)."""

    async def _stop(self) -> None:
        """Release resources (override)."""

    @property
    def started(self) -> bool:
        """Whether ``start()`` has completed and ``stop()`` has not been called since."""
        return self._started

    async def start(self) -> None:
        """Start once; see the class docstring."""
        if self._started:
            return
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        self._started = True

    async def stop(self) -> None:
        """Stop once; see the class docstring."""
        if not self._started:
            return
        self._started = False
        await self._stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


@contextlib.asynccontextmanager
async def stop_signals() -> AsyncIterator[asyncio.Event]:
    """An event that SIGINT or SIGTERM sets while the block runs (handlers removed after)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

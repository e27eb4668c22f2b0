"""A request's passage between the event loop and the model thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from core.errors import GenerationError
from core.generation.base import GenerationRequest, TokenDelta
from core.generation.local.decoding import TokenSink


class Ticket:
    """One request on its way through the model thread, and its deltas on their way back.

    (The fleet's queued jobs are :class:`core.generation.fleet.jobs.QueuedJob`; this is the
    in-process counterpart, so it has a name of its own.)

    The model thread calls :meth:`emit` and :meth:`fail`; the event loop reads
    :attr:`output` and calls :meth:`cancel` when its consumer goes away.
    """

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.output: asyncio.Queue[TokenDelta | GenerationError] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()
        self._cancel_callbacks: list[Callable[[], None]] = []
        self.prepared: TokenSink | None = None  # set by schedulers that prepare ahead

    @property
    def cancelled(self) -> bool:
        """Whether nobody is listening any more; the model thread should drop the job."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop work on this job (called from any thread); runs the cancel callbacks once."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        for callback in self._cancel_callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the cancelling thread) when the job is cancelled."""
        self._cancel_callbacks.append(callback)

    def emit(self, delta: TokenDelta) -> None:
        """Hand a delta to the consumer (called from the model thread)."""
        self._send(delta)

    def fail(self, error: GenerationError) -> None:
        """End the job with ``error``, raised in the consumer (called from any thread)."""
        self._send(error)
        self.cancel()

    def _send(self, item: TokenDelta | GenerationError) -> None:
        try:
            self._loop.call_soon_threadsafe(self.output.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody will read this
            self.cancel()

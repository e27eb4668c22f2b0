"""The scheduler behind ``generation.batching = false``: one request at a time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable

from core.errors import GenerationError
from core.generation.local.runner import HFRunner
from core.generation.local.ticket import Ticket

log = logging.getLogger(__name__)


class SequentialScheduler:
    """One model thread that loads the model, then runs queued jobs first come first served.

    A job cancelled while waiting is skipped; one cancelled while running stops at its
    next token.
    """

    def __init__(self, load: Callable[[], HFRunner]) -> None:
        self._load = load
        self._queue: queue.SimpleQueue[Ticket | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._current: Ticket | None = None
        self._stopping = threading.Event()
        self.runner: HFRunner | None = None

    async def start(self) -> None:
        """Start the thread and wait, without blocking the loop, until the model is loaded."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._work, args=(ready,), name="parley-model", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(ready)

    def submit(self, job: Ticket) -> None:
        """Queue ``job``; its deltas arrive on ``job.output``."""
        self._queue.put(job)

    async def stop(self) -> None:
        """Fail waiting and running jobs, end the thread and wait for it."""
        self._stopping.set()
        self._queue.put(None)
        current = self._current
        if current is not None:
            current.fail(GenerationError("the generator was stopped"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._thread = None
        self.runner = None

    def _work(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            runner = self._load()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        self.runner = runner
        ready.set_result(None)
        while (job := self._queue.get()) is not None:
            if job.cancelled:
                continue
            if self._stopping.is_set():
                job.fail(GenerationError("the generator was stopped"))
                continue
            self._current = job
            try:
                runner.run(job)
            except Exception as exc:
                log.exception("generation failed for request %s", job.request.request_id)
                job.fail(GenerationError(f"generation failed: {exc}"))
            finally:
                self._current = None
        while True:  # fail what was queued behind the stop signal
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                break
            if left is not None:
                left.fail(GenerationError("the generator was stopped"))

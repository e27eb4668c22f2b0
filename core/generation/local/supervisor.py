"""Keeps one checked batching manager running, and says so.

The manager runs the model on a thread of its own; an exception there (a model forward,
a cache allocation) ends that thread, and a scheduler that did not notice would queue
requests forever. :class:`ManagerSupervisor` starts the manager through the self-check
(``selfcheck.py``), watches its thread, and when it dies tells the scheduler at once (so
every waiting and running request fails with a :class:`GenerationError`), reports not
ready with the reason, and starts a new manager. After :data:`MAX_RESTARTS` deaths or
failed starts within :data:`RESTART_WINDOW` seconds it gives up: not ready and not
healthy, for an operator (or an orchestrator's liveness probe) to act on.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from core.errors import GenerationError
from core.generation.base import Readiness
from core.generation.local.hf.manager import (
    ManagerSpec,
    loop_error,
    start_manager,
    stop_manager,
)
from core.generation.local.hf.patch import Patch
from core.generation.local.runner import HFRunner
from core.generation.local.selfcheck import Reference, open_manager, probe, reference
from core.threads import in_own_thread

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.1  # seconds between two looks at the manager's thread
MAX_RESTARTS = 3  # deaths (or failed restarts) tolerated within RESTART_WINDOW
RESTART_WINDOW = 600.0
RESTART_PAUSE = 0.5  # seconds before restart attempt n, times n


def transformers_version() -> str:
    """The installed transformers release, for log lines."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


class ManagerSupervisor:
    """Owns the batching manager of one scheduler; see the module docstring."""

    def __init__(self, runner: HFRunner, spec: ManagerSpec, patches: Sequence[Patch]) -> None:
        self.runner = runner
        self.spec = spec
        self.patches: list[Patch] = list(patches)
        self.manager: Any = None
        self.readiness = Readiness(False, "starting")
        self._reference: Reference | None = None
        self._deaths: deque[float] = deque()
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False
        self._on_death: Callable[[str], None] = lambda reason: None
        self._on_ready: Callable[[], None] = lambda: None

    @staticmethod
    def spec_for(runner: HFRunner, *, max_batch: int, kv_cache_tokens: int | None,
                 page_size: int, max_batch_tokens: int,
                 prefix_sharing: bool = True) -> ManagerSpec:
        """The manager's sizes for ``runner``'s model and these limits."""
        loaded = runner.loaded
        cache_tokens = kv_cache_tokens or max_batch * min(runner.context, 1024)
        return ManagerSpec(
            num_blocks=math.ceil(cache_tokens / page_size), page_size=page_size,
            max_batch_tokens=max_batch_tokens, max_requests=max_batch,
            pad_token_id=loaded.tokenizer.pad_token_id or 0,
            attention=str(loaded.model.config._attn_implementation),
            prefix_sharing=prefix_sharing,
        )

    async def open(self) -> None:
        """Start a manager that passes the self-check, switching off patches that fail it.

        Raises :class:`GenerationError` when even the manager's own path fails.
        """
        loaded = self.runner.loaded
        # On a thread that ends: see core/threads.py.
        self._reference = await in_own_thread(reference, loaded.model, loaded.tokenizer,
                                              name="parley-selfcheck")
        opened = await open_manager(self._start, self._stop, self._reference, self.patches)
        self.manager, self.patches = opened.manager, opened.patches
        if opened.switched_off:
            log.warning(
                "transformers %s: switched off %s; the batching manager's own code runs instead",
                transformers_version(),
                "; ".join(f"{patch.name} ({reason})" for patch, reason in opened.switched_off),
            )
        self.readiness = Readiness(True)

    def watch(self, on_death: Callable[[str], None], on_ready: Callable[[], None]) -> None:
        """Watch the manager's thread: ``on_death(reason)`` when it dies, ``on_ready()``
        when a new manager has taken over."""
        self._on_death, self._on_ready = on_death, on_ready
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def forget(self, request_id: str) -> None:
        """Let the manager drop what it keeps of a request Parley finished with."""
        if self.manager is not None:
            for patch in self.patches:
                patch.forget(self.manager, request_id)

    async def close(self) -> None:
        """Stop watching and stop the manager."""
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        manager, self.manager = self.manager, None
        if manager is not None:
            await self._stop(manager)
        self.readiness = Readiness(False, "stopped")

    async def _start(self, patches: Sequence[Patch]) -> Any:
        return await asyncio.to_thread(start_manager, self.runner.loaded.model, self.spec, patches)

    async def _stop(self, manager: Any) -> None:
        await asyncio.to_thread(stop_manager, self.runner.loaded.model, self.spec, manager)

    async def _watch(self) -> None:
        while not self._closing:
            await asyncio.sleep(WATCH_INTERVAL)
            manager = self.manager
            if manager is None or manager.is_running():
                continue
            reason = f"the generation loop died: {loop_error(manager)}"
            log.error("%s; failing its requests and restarting it", reason)
            self.manager = None
            self.readiness = Readiness(False, f"{reason}; restarting")
            self._on_death(reason)
            await self._stop(manager)
            await self._restart(reason)

    async def _restart(self, reason: str) -> None:
        assert self._reference is not None
        attempt = 0
        while not self._closing:
            now = time.monotonic()
            self._deaths.append(now)
            while self._deaths and now - self._deaths[0] > RESTART_WINDOW:
                self._deaths.popleft()
            if len(self._deaths) > MAX_RESTARTS:
                self.readiness = Readiness(
                    False, f"{reason}; gave up after {MAX_RESTARTS} restarts within "
                    f"{RESTART_WINDOW:g} s", healthy=False)
                log.error("generation: %s", self.readiness.reason)
                return
            attempt += 1
            await asyncio.sleep(RESTART_PAUSE * attempt)
            try:
                manager = await self._start(self.patches)
            except GenerationError as exc:
                reason = f"restarting the generation loop failed: {exc}"
                log.error("%s", reason)
                continue
            failed = await probe(manager, self._reference)
            if failed is None:
                self.manager = manager
                self.readiness = Readiness(True)
                log.warning("generation loop restarted (attempt %d)", attempt)
                self._on_ready()
                return
            await self._stop(manager)
            reason = f"the restarted generation loop failed its self-check: {failed}"
            log.error("%s", reason)


"""The in-process generator: one model thread behind an async ``stream()``.

Three parts, so that each can be replaced alone:

- a :class:`~core.generation.local.ticket.Ticket` carries one request from the event
  loop to the model thread and its deltas back, with a cancel flag the consumer sets
  when it stops listening;
- a scheduler decides what runs:
  :class:`~core.generation.local.sequential.SequentialScheduler` owns a model thread
  and runs queued requests one at a time (``generation.batching = false``);
  :class:`~core.generation.local.batching.BatchingScheduler` (the default) serves them
  through transformers' continuous batching;
- :class:`~core.generation.local.runner.HFRunner` prepares a request's prompt and runs
  one request on a transformers model, turning each new token into text through a
  :class:`~core.generation.local.decoding.TokenSink`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from core.config import BotSettings, GenerationSection
from core.errors import GenerationError, GeneratorBusy
from core.generation.base import GenerationRequest, Readiness, TokenDelta, backend_settings
from core.generation.local.batching import BatchingScheduler, BatchLimits
from core.generation.local.hf.patch import Patch
from core.generation.local.models import LoadedModel, cache_dir, check_model_spec, load_model
from core.generation.local.prompt import context_window
from core.generation.local.runner import HFRunner
from core.generation.local.sequential import SequentialScheduler
from core.generation.local.settings import LocalSettings
from core.generation.local.supervisor import transformers_version
from core.generation.local.ticket import Ticket
from core.lifecycle import ServiceBase

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """Prompt tokens asked for, how many of them began like the bot's previous prompt,
    tokens generated, and tokens the model computed (None: not counted; one at a time,
    every prompt token and every generated token but the last is computed)."""

    prompt: int
    shared_prompt: int
    generated: int
    computed: int | None


class LocalGenerator(ServiceBase):
    """Generates in this process, on a model loaded from ``generation.model``."""

    def __init__(self, settings: BotSettings, *, patches: Sequence[Patch] | None = None,
                 load: Callable[[], LoadedModel] | None = None) -> None:
        self.settings: GenerationSection = settings.generation
        self.options = backend_settings(settings.generation, LocalSettings, source=settings.source)
        self._patches = patches  # the seam's patches; None: the default set
        self._load_model = load  # None: load generation.model (benchmarks build their own)
        # A misspelt preset or a missing directory fails here, before anything loads.
        check_model_spec(self.settings.model, settings.source)
        self._scheduler: SequentialScheduler | BatchingScheduler | None = None

    @property
    def tokens_generated(self) -> int:
        """Tokens the model has produced since start, cancelled requests included."""
        runner = self._scheduler.runner if self._scheduler is not None else None
        return runner.tokens_generated if runner is not None else 0

    def token_counts(self) -> TokenCounts:
        """What the model has done since start (the probe's few tokens included)."""
        scheduler = self._scheduler
        runner = scheduler.runner if scheduler is not None else None
        if runner is None:
            return TokenCounts(0, 0, 0, None)
        computed = scheduler.tokens_computed if isinstance(scheduler, BatchingScheduler) else None
        return TokenCounts(runner.prompt_tokens, runner.shared_prompt_tokens,
                           runner.tokens_generated, computed)

    def _load(self) -> HFRunner:
        options = self.options
        loaded = self._load_model() if self._load_model is not None else load_model(
            self.settings.model, device=options.device, dtype=options.dtype,
            cache=cache_dir(options.cache_dir),
        )
        context = context_window(options.context_tokens, loaded.max_positions, loaded.device)
        return HFRunner(loaded, context)

    def readiness(self) -> Readiness:
        """Ready once started; with batching, while the manager's loop runs."""
        scheduler = self._scheduler
        if scheduler is None or not self.started:
            return Readiness(False, "not started")
        if isinstance(scheduler, BatchingScheduler):
            return scheduler.readiness()
        return Readiness(True)

    async def _start(self) -> None:
        settings = self.options
        if not settings.batching:
            self._scheduler = SequentialScheduler(self._load)
            await self._scheduler.start()
            return
        batching = BatchingScheduler(self._load, BatchLimits(
            max_batch=settings.max_batch, max_waiting=settings.max_waiting,
            max_per_user=settings.max_per_user, kv_cache_tokens=settings.kv_cache_tokens,
            max_batch_tokens=settings.batch_tokens, prefix_sharing=settings.prefix_sharing,
            page_size=settings.kv_page_tokens,
        ), self._patches)
        try:
            await batching.start()
        except GenerationError as exc:
            runner = batching.runner
            await batching.stop()
            if runner is None:  # the model did not load: nothing to fall back on
                raise
            log.warning("transformers %s: %s; serving one request at a time instead",
                        transformers_version(), exc)
            self._scheduler = SequentialScheduler(lambda: runner)
            await self._scheduler.start()
            return
        self._scheduler = batching

    async def _stop(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            await scheduler.stop()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """The reply to ``request``, piece by piece; closing the iterator cancels it."""
        scheduler = self._scheduler
        if scheduler is None or not self.started:
            raise GenerationError("the local generator is not started")
        job = Ticket(request, asyncio.get_running_loop())
        scheduler.submit(job)
        try:
            try:
                async with asyncio.timeout(self.settings.timeout):
                    item = await job.output.get()
            except TimeoutError:
                raise GeneratorBusy(
                    f"no reply started within {self.settings.timeout:g} s; the model is busy"
                ) from None
            while True:
                if isinstance(item, GenerationError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
                item = await job.output.get()
        finally:
            job.cancel()


def create(settings: BotSettings) -> LocalGenerator:
    """Entry point ``parley.generators: local``."""
    return LocalGenerator(settings)

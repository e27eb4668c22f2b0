"""The in-process generator: one model thread behind an async ``stream()``.

Three parts, so that each can be replaced alone:

- :class:`Job` carries one request from the event loop to the model thread and its
  deltas back, with a cancel flag the consumer sets when it stops listening;
- a scheduler decides what runs: :class:`SequentialScheduler` owns a model thread and
  runs queued jobs one at a time (``generation.batching = false``);
  :class:`~core.generation.batching.BatchingScheduler` (the default) serves them through
  transformers' continuous batching;
- :class:`HFRunner` executes one job on a transformers model, turning each new token
  into text through a :class:`TokenSink`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from core.config import BotSettings, GenerationSection
from core.errors import GenerationError, GeneratorBusy
from core.generation.base import FinishReason, GenerationRequest, TokenDelta
from core.generation.batching import BatchingScheduler, BatchLimits
from core.generation.decoding import IncrementalDecoder, StopMatcher
from core.generation.models import LoadedModel, cache_dir, load_model
from core.generation.prompt import build_prompt, context_window, prompt_budget, transcript_stops
from core.lifecycle import ServiceBase

log = logging.getLogger(__name__)


class Job:
    """One request on its way through the model thread.

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


class TokenSink:
    """Turns a job's new token ids into deltas: detokenizes, finds stops, counts.

    :meth:`push` returns True once the job is finished (end token, stop string, length,
    or cancellation); by then the final delta has been emitted, unless cancelled.
    """

    def __init__(
        self,
        job: Job,
        tokenizer: Any,
        prompt_ids: list[int],
        end_ids: tuple[int, ...],
        stops: tuple[str, ...],
        max_new_tokens: int,
    ) -> None:
        self.job = job
        self.prompt_ids = prompt_ids
        self.count = 0
        self.finish_reason: FinishReason | None = None
        self._decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self._stops = StopMatcher(stops)
        self._end_ids = frozenset(end_ids)
        self.max_new_tokens = max_new_tokens
        self._shown = False
        self._space = ""

    @property
    def done(self) -> bool:
        """Whether no more tokens are wanted."""
        return self.finish_reason is not None or self.job.cancelled

    def push(self, token_id: int) -> bool:
        """Take the next generated token; True when generation should stop."""
        if self.done:
            return True
        self.count += 1
        if token_id in self._end_ids:
            self.finish("stop")
            return True
        self._show(self._stops.push(self._decoder.push(token_id)))
        if self._stops.stopped:
            self.finish("stop")
        elif self.count >= self.max_new_tokens:
            self.finish("length")
        return self.done

    def finish(self, reason: FinishReason) -> None:
        """Emit what was held back and the final delta, once."""
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        rest = self._stops.push(self._decoder.flush())
        rest += self._stops.flush()
        if self.job.cancelled:
            return
        rest = rest.strip() if not self._shown else rest.rstrip()
        self.job.emit(TokenDelta(self._space + rest if rest else "", finish_reason=reason))

    def _show(self, text: str) -> None:
        # A reply neither starts nor ends with whitespace (base models put a space after
        # "Assistant:" and a newline before the next speaker), so whitespace is held back
        # until something follows it.
        if not self._shown:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            self._space += text
            return
        self.job.emit(TokenDelta(self._space + body))
        self._space = text[len(body) :]
        self._shown = True


class HFRunner:
    """Runs one job at a time on a transformers model (the model step)."""

    def __init__(self, loaded: LoadedModel, context: int) -> None:
        self.loaded = loaded
        self.context = context
        self.tokens_generated = 0

    def prepare(self, job: Job) -> tuple[list[int], TokenSink]:
        """The prompt ids of ``job`` and the sink its tokens go to (any scheduler's first step)."""
        loaded, sampling = self.loaded, job.request.sampling
        if not (0.0 < sampling.top_p <= 1.0) or sampling.temperature < 0:
            raise ValueError(
                f"invalid sampling: temperature {sampling.temperature}, top_p {sampling.top_p} "
                "(need temperature >= 0 and 0 < top_p <= 1)"
            )
        budget = prompt_budget(self.context, sampling.max_new_tokens)
        prompt = build_prompt(loaded.tokenizer, job.request.messages, loaded.prompt_format, budget)
        if prompt.dropped or prompt.truncated:
            log.debug("request %s: dropped %d messages (truncated: %s) to fit %d tokens",
                      job.request.request_id, prompt.dropped, prompt.truncated, budget)
        max_new = max(1, min(sampling.max_new_tokens, self.context - len(prompt.ids)))
        stops = sampling.stop
        if loaded.prompt_format == "transcript":
            stops += transcript_stops()
        end_ids = loaded.end_token_ids
        if sampling.ignore_eos:
            stops, end_ids = (), ()
        sink = TokenSink(job, loaded.tokenizer, prompt.ids, end_ids, stops, max_new)
        return prompt.ids, sink

    def run(self, job: Job) -> None:
        """Generate ``job``'s reply, emitting deltas as tokens come; raises on failure."""
        import torch
        from transformers import StoppingCriteriaList

        loaded, sampling = self.loaded, job.request.sampling
        prompt_ids, sink = self.prepare(job)

        def stop_criterion(input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            self.tokens_generated += 1
            done = sink.push(int(input_ids[0, -1]))
            return torch.full(input_ids.shape[:1], done, dtype=torch.bool, device=input_ids.device)

        config = copy.deepcopy(loaded.model.generation_config)
        config.max_new_tokens = sink.max_new_tokens
        # None would fall back to the model's own end token; -1 is no token at all.
        config.eos_token_id = -1 if sampling.ignore_eos else list(loaded.end_token_ids) or None
        config.pad_token_id = loaded.tokenizer.pad_token_id
        if config.pad_token_id is None and loaded.end_token_ids:
            config.pad_token_id = loaded.end_token_ids[0]
        config.do_sample = sampling.temperature > 0
        if config.do_sample:
            config.temperature, config.top_p = sampling.temperature, sampling.top_p
        else:
            config.temperature = config.top_p = config.top_k = None
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=loaded.device)
        with torch.inference_mode():
            loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([stop_criterion]),
            )
        sink.finish("length")  # a no-op unless generate stopped on a limit of its own


class SequentialScheduler:
    """One model thread that loads the model, then runs queued jobs first come first served.

    A job cancelled while waiting is skipped; one cancelled while running stops at its
    next token.
    """

    def __init__(self, load: Callable[[], HFRunner]) -> None:
        self._load = load
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._current: Job | None = None
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

    def submit(self, job: Job) -> None:
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


class LocalGenerator(ServiceBase):
    """Generates in this process, on a model loaded from ``generation.model``."""

    def __init__(self, settings: BotSettings) -> None:
        self.settings: GenerationSection = settings.generation
        self._scheduler: SequentialScheduler | BatchingScheduler | None = None

    @property
    def tokens_generated(self) -> int:
        """Tokens the model has produced since start, cancelled requests included."""
        runner = self._scheduler.runner if self._scheduler is not None else None
        return runner.tokens_generated if runner is not None else 0

    def _load(self) -> HFRunner:
        settings = self.settings
        loaded = load_model(
            settings.model, device=settings.device, dtype=settings.dtype,
            cache=cache_dir(settings.cache_dir),
        )
        context = context_window(settings.context_tokens, loaded.max_positions, loaded.device)
        return HFRunner(loaded, context)

    async def _start(self) -> None:
        settings = self.settings
        if settings.batching:
            self._scheduler = BatchingScheduler(self._load, BatchLimits(
                max_batch=settings.max_batch, max_waiting=settings.max_waiting,
                max_per_user=settings.max_per_user, kv_cache_tokens=settings.kv_cache_tokens,
                max_batch_tokens=settings.batch_tokens,
            ))
        else:
            self._scheduler = SequentialScheduler(self._load)
        await self._scheduler.start()

    async def _stop(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            await scheduler.stop()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """The reply to ``request``, piece by piece; closing the iterator cancels it."""
        scheduler = self._scheduler
        if scheduler is None or not self.started:
            raise GenerationError("the local generator is not started")
        job = Job(request, asyncio.get_running_loop())
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

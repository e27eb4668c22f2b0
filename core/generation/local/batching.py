"""Continuous batching for the local backend, on transformers' own batching manager.

transformers' ``ContinuousBatchingManager`` runs the model: requests join and leave the
running batch at every decode step, each with its own KV-cache pages. This module is what
Parley builds around it:

- :class:`~core.generation.local.fair_queue.FairQueue` decides who gets the next free
  batch slot.
- :class:`BatchingScheduler` admits jobs into the manager, turns its cumulative token
  lists into deltas through each job's :class:`~core.generation.local.decoding.TokenSink` (stop
  strings, end-of-turn, length), and frees a slot as soon as a job ends or its consumer
  goes away. The manager's own ``cancel_request`` sends no final event and leaves the
  result handler registered; the scheduler drops the handler and ignores late events.

Everything here runs on the event loop except the manager's model thread; the manager
delivers results onto the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.errors import GenerationError, GeneratorBusy
from core.generation.base import ChatMessage, GenerationRequest, SamplingParams
from core.generation.local.decoding import TokenSink
from core.generation.local.fair_queue import FairQueue, user_key
from core.generation.local.hf.attention import ATTENTION_NAME, use_varlen_attention
from core.generation.local.runner import HFRunner
from core.generation.local.ticket import Ticket

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """How much the scheduler takes on."""

    max_batch: int = 32  # requests decoding together
    max_waiting: int = 256  # requests waiting for a slot; beyond that, "busy"
    max_per_user: int = 4  # requests one user may have running
    kv_cache_tokens: int | None = None  # KV cache size; default: max_batch * 1024 tokens
    page_size: int = 64  # tokens per KV-cache page
    max_batch_tokens: int = 512  # tokens per forward pass (bounds prefill chunks)
    newcomers_first: bool = True  # prompts get a step of their own (see hf/scheduler.py)


@dataclass(slots=True)
class _Running:
    job: Ticket
    sink: TokenSink
    rid: str
    sent: int = 0


class BatchingScheduler:
    """Serves jobs through one ``ContinuousBatchingManager``; same surface as the
    sequential scheduler (``start``, ``submit``, ``stop``, ``runner``)."""

    def __init__(self, load: Callable[[], HFRunner], limits: BatchLimits) -> None:
        self._load = load
        self.limits = limits
        self.runner: HFRunner | None = None
        self._manager: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue = FairQueue(limits.max_waiting, limits.max_per_user)
        self._running: dict[Ticket, _Running] = {}
        self._by_tenant: Counter[str] = Counter()
        self._by_user: Counter[str] = Counter()
        self._preparing: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def waiting(self) -> int:
        """Tickets waiting for a batch slot."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Tickets in the running batch."""
        return len(self._running)

    async def start(self) -> None:
        """Load the model and start the batching manager, off the event loop."""
        self._loop = asyncio.get_running_loop()
        self.runner = await asyncio.to_thread(self._load)
        self._manager = await asyncio.to_thread(self._start_manager, self.runner)
        await self._warm_up()

    async def _warm_up(self) -> None:
        """One short request through the whole path, so the first user does not pay for
        lazy initialisation (kernels, allocator, CUDA graphs)."""
        job = Ticket(GenerationRequest((ChatMessage("user", "Hello"),),
                                    SamplingParams(max_new_tokens=2, temperature=0.0),
                                    tenant="parley-warm-up"), asyncio.get_running_loop())
        self.submit(job)
        while True:
            item = await job.output.get()
            if isinstance(item, GenerationError):
                raise item
            if item.finish_reason is not None:
                break
        assert self.runner is not None
        self.runner.tokens_generated = 0

    def _start_manager(self, runner: HFRunner) -> Any:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        from core.generation.local.hf import scheduler as newcomers
        from core.generation.local.hf.sampler import batch_processors, sample_in_processor

        loaded, limits = runner.loaded, self.limits
        # transformers gives this logger a console handler of its own; keep it to warnings
        # unless Parley itself is debugging.
        logging.getLogger("ContinuousBatchingLogger").setLevel(
            logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING
        )
        # do_sample is global, so every request samples; greedy is asked for per request
        # as top_p = 0, which leaves only the argmax. The temperature must be non-neutral
        # for the manager to plan for logits processing at all.
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=True, temperature=0.9999,
            # No global end token: each request names its own (none with ignore_eos).
            max_new_tokens=256, eos_token_id=None,
            pad_token_id=loaded.tokenizer.pad_token_id or 0,
        )
        cache_tokens = limits.kv_cache_tokens or limits.max_batch * min(runner.context, 1024)
        batching = ContinuousBatchingConfig(
            num_blocks=math.ceil(cache_tokens / limits.page_size),
            page_size=limits.page_size,
            max_batch_tokens=limits.max_batch_tokens,
            max_requests_per_batch=limits.max_batch,
            max_memory_percent=0.9,
            per_request_processors=True,
            allow_block_sharing=True,  # a bot's shared system prompt is cached once
            scheduler_type=newcomers.register() if limits.newcomers_first else "fifo",
        )
        manager = loaded.model.init_continuous_batching(
            generation_config=config, continuous_batching_config=batching
        )
        # The manager's own top-k/top-p sort the whole vocabulary for every row at every
        # step; swap in a sampler that does not (see hf/sampler.py). The
        # batch processor that uses this list is only built by start().
        manager.logit_processor = batch_processors(default_temperature=0.9999)
        attention = str(loaded.model.config._attn_implementation)
        if "flash" not in attention:
            # Without flash kernels the manager attends over the whole packed batch;
            # attend per request instead (see hf/attention.py).
            use_varlen_attention(loaded.model)
            attention = ATTENTION_NAME
        manager.start()
        # start() does not raise: the cache is allocated on the manager's thread, and a
        # failure there only shows as a dead thread.
        deadline = time.monotonic() + 120
        while manager.batch_processor is None:
            error = manager.background_thread_status.fatal_error
            if error is not None or not manager.is_running():
                raise GenerationError(f"continuous batching failed to start: {error}")
            if time.monotonic() > deadline:
                raise GenerationError("continuous batching did not start within 120 s")
            time.sleep(0.01)
        sample_in_processor(manager.batch_processor)
        log.info("continuous batching: %d slots, KV cache %d tokens in pages of %d, %s attention",
                 limits.max_batch, cache_tokens, limits.page_size, attention)
        return manager

    def submit(self, job: Ticket) -> None:
        """Prepare ``job``'s prompt off the loop, then queue it for a slot."""
        if self._stopping or self.runner is None:
            job.fail(GenerationError("the generator is not running"))
            return
        if len(self._queue) + len(self._preparing) >= self.limits.max_waiting:
            job.fail(GeneratorBusy(f"{self.limits.max_waiting} requests are already waiting"))
            return
        task = asyncio.get_running_loop().create_task(self._prepare(job))
        self._preparing.add(task)
        task.add_done_callback(self._preparing.discard)

    async def _prepare(self, job: Ticket) -> None:
        runner = self.runner
        assert runner is not None
        try:
            _, sink = await asyncio.to_thread(runner.prepare, job)
        except Exception as exc:
            log.exception("preparing request %s failed", job.request.request_id)
            job.fail(GenerationError(f"could not build the prompt: {exc}"))
            return
        if job.cancelled or self._stopping:
            return
        job.prepared = sink
        self._queue.push(job)
        job.on_cancel(lambda: self._call_soon(self._cancel, job))
        self._pump()

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, *args)

    def _pump(self) -> None:
        """Admit waiting jobs while there are free slots."""
        while len(self._running) < self.limits.max_batch:
            job = self._queue.pop(self._by_tenant, self._by_user)
            if job is None:
                return
            if not job.cancelled:
                self._admit(job)

    def _admit(self, job: Ticket) -> None:
        sink: TokenSink | None = job.prepared
        assert sink is not None and self.runner is not None
        sampling = job.request.sampling
        rid = f"{job.request.request_id}-{uuid.uuid4().hex[:8]}"  # a duplicate id kills the manager
        run = _Running(job, sink, rid)
        self._running[job] = run
        self._by_tenant[job.request.tenant] += 1
        self._by_user[user_key(job)] += 1
        end_ids = () if sampling.ignore_eos else self.runner.loaded.end_token_ids
        extra: dict[str, Any] = (
            {"top_p": 0.0} if sampling.temperature <= 0  # greedy: only the argmax survives
            else {"temperature": sampling.temperature, "top_p": sampling.top_p}
        )
        self._manager.register_result_handler(rid, lambda out: self._on_output(run, out))
        added = self._manager.add_request(
            list(sink.prompt_ids), request_id=rid, max_new_tokens=sink.max_new_tokens,
            streaming=True,
            eos_token_id=list(end_ids) or None,
            **extra,
        )
        if added is None:
            self._release(run, cancel=False)
            job.fail(GenerationError("the batching manager is not running"))

    def _on_output(self, run: _Running, output: Any) -> None:
        if self._running.get(run.job) is not run:
            return  # a late event for a job that already ended
        tokens = output.generated_tokens
        done = False
        for token in tokens[run.sent:]:
            self.runner.tokens_generated += 1  # type: ignore[union-attr]
            if run.sink.push(int(token)):
                done = True
                break
        run.sent = len(tokens)
        if output.is_finished():
            if getattr(output, "error", None):
                self._release(run, cancel=False)
                run.job.fail(GenerationError(f"generation failed: {output.error}"))
                return
            run.sink.finish("length")  # no-op if the sink already finished
            done = True
        if done:
            self._release(run, cancel=not output.is_finished())

    def _cancel(self, job: Ticket) -> None:
        if self._queue.discard(job):
            return
        run = self._running.get(job)
        if run is not None:
            self._release(run, cancel=True)

    def _release(self, run: _Running, *, cancel: bool) -> None:
        if self._running.pop(run.job, None) is None:
            return
        self._by_tenant[run.job.request.tenant] -= 1
        self._by_user[user_key(run.job)] -= 1
        if cancel:
            self._manager.cancel_request(run.rid)
        # The manager keeps handlers of cancelled requests registered; drop ours.
        router = self._manager.output_router
        with router._lock:
            router.result_handlers.pop(run.rid, None)
        if not self._stopping:
            self._pump()

    async def stop(self) -> None:
        """Fail waiting and running jobs and stop the manager."""
        self._stopping = True
        for task in list(self._preparing):
            task.cancel()
        error = GenerationError("the generator was stopped")
        for job in self._queue.drain():
            job.fail(error)
        for run in list(self._running.values()):
            self._release(run, cancel=True)
            run.job.fail(error)
        manager, self._manager = self._manager, None
        if manager is not None:
            await asyncio.to_thread(manager.stop, True, 30)
        self.runner = None

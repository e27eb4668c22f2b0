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
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import GenerationError, GeneratorBusy
from core.generation.base import Readiness
from core.generation.local.decoding import TokenSink
from core.generation.local.fair_queue import FairQueue, user_key
from core.generation.local.hf.manager import attention_in_use
from core.generation.local.hf.patch import Patch, default_patches
from core.generation.local.runner import HFRunner
from core.generation.local.supervisor import ManagerSupervisor
from core.generation.local.ticket import Ticket

log = logging.getLogger(__name__)


def page_size_for(device: str) -> int:
    """KV-cache page size: small pages let prefix sharing reuse more of a short persona
    (measured on CPU: 16 computed 25 % fewer tokens per message than 64 for the demo bot);
    GPU attention kernels prefer larger pages."""
    return 64 if device.startswith("cuda") else 16


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """How much the scheduler takes on."""

    max_batch: int = 32  # requests decoding together
    max_waiting: int = 256  # requests waiting for a slot; beyond that, "busy"
    max_per_user: int = 4  # requests one user may have running
    kv_cache_tokens: int | None = None  # KV cache size; default: max_batch * 1024 tokens
    page_size: int | None = None  # tokens per KV-cache page; None: 16 on CPU, 64 on GPU
    max_batch_tokens: int = 512  # tokens per forward pass (bounds prefill chunks)
    newcomers_first: bool = True  # prompts get a step of their own (see hf/scheduler.py)
    prefix_sharing: bool = True  # prompt pages already in the KV cache are not recomputed


@dataclass(slots=True)
class _Running:
    job: Ticket
    sink: TokenSink
    rid: str
    sent: int = 0


class BatchingScheduler:
    """Serves tickets through one ``ContinuousBatchingManager``; same surface as the
    sequential scheduler (``start``, ``submit``, ``stop``, ``runner``).

    ``patches`` replaces the seam's default set (``hf/patch.py``); tests pass their own.
    """

    def __init__(self, load: Callable[[], HFRunner], limits: BatchLimits,
                 patches: Sequence[Patch] | None = None) -> None:
        self._load = load
        self.limits = limits
        self.runner: HFRunner | None = None
        self._patches = patches
        self._supervisor: ManagerSupervisor | None = None
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

    @property
    def tokens_computed(self) -> int | None:
        """Tokens the model's forward passes computed, as the schedule counts them (None
        when the schedule patch is switched off)."""
        supervisor = self._supervisor
        for patch in supervisor.patches if supervisor is not None else ():
            tokens = getattr(patch, "tokens", None)  # the schedule's (hf/scheduler.py)
            if tokens is not None:
                return int(tokens.computed)
        return None

    @property
    def patches(self) -> list[str]:
        """The names of the seam's patches the manager runs with (after the self-check)."""
        supervisor = self._supervisor
        return [patch.name for patch in supervisor.patches] if supervisor is not None else []

    def readiness(self) -> Readiness:
        """Whether the manager's loop is running (see ``supervisor.py``)."""
        if self._supervisor is None:
            return Readiness(False, "starting" if not self._stopping else "stopped")
        return self._supervisor.readiness

    async def start(self) -> None:
        """Load the model and start a manager that passes the self-check, off the event loop.

        Raises :class:`GenerationError` when even the manager's own path fails it; the
        loaded model stays in :attr:`runner` for a scheduler that does without batching.
        """
        self._loop = asyncio.get_running_loop()
        runner = self.runner = await asyncio.to_thread(self._load)
        limits = self.limits
        spec = ManagerSupervisor.spec_for(
            runner, max_batch=limits.max_batch, kv_cache_tokens=limits.kv_cache_tokens,
            page_size=limits.page_size or page_size_for(runner.loaded.device),
            max_batch_tokens=limits.max_batch_tokens,
            prefix_sharing=limits.prefix_sharing,
        )
        patches = (self._patches if self._patches is not None
                   else default_patches(newcomers_first=limits.newcomers_first))
        supervisor = ManagerSupervisor(runner, spec, patches)
        await supervisor.open()
        self._supervisor = supervisor
        supervisor.watch(self._loop_died, self._pump)
        log.info("continuous batching: %d slots, KV cache %d pages of %d tokens, %s attention; "
                 "patches: %s", limits.max_batch, spec.num_blocks, spec.page_size,
                 attention_in_use(runner.loaded.model), ", ".join(self.patches) or "none")

    def submit(self, job: Ticket) -> None:
        """Prepare ``job``'s prompt off the loop, then queue it for a slot."""
        if self._stopping or self.runner is None:
            job.fail(GenerationError("the generator is not running"))
            return
        if not self.readiness().healthy:
            job.fail(GenerationError(f"the generator is down: {self.readiness().reason}"))
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

    @property
    def _manager(self) -> Any:
        return self._supervisor.manager if self._supervisor is not None else None

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, *args)

    def _pump(self) -> None:
        """Admit waiting tickets while there are free slots and a running manager (after
        a death they wait for the supervisor, which fails them with the reason)."""
        manager = self._manager
        if manager is None or not manager.is_running():
            return
        while len(self._running) < self.limits.max_batch:
            job = self._queue.pop(self._by_tenant, self._by_user)
            if job is None:
                return
            if not job.cancelled and not self._admit(job):
                return

    def _admit(self, job: Ticket) -> bool:
        """Hand ``job`` to the manager; False if the manager took no more."""
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
        penalty, ngram = self.runner.repetition(sampling)
        if penalty != 1.0:
            extra["repetition_penalty"] = float(penalty)
        if ngram > 0:
            extra["no_repeat_ngram_size"] = int(ngram)
        self._manager.register_result_handler(rid, lambda out: self._on_output(run, out))
        added = self._manager.add_request(
            list(sink.prompt_ids), request_id=rid, max_new_tokens=sink.max_new_tokens,
            streaming=True,
            eos_token_id=list(end_ids) or -1,
            **extra,
        )
        if added is None:
            # The manager is going down (its loop failed, it is failing what it had): the
            # ticket waits again, for the supervisor to fail it with the reason or for a
            # new manager to take it.
            self._running.pop(job, None)
            assert self._supervisor is not None
            self._supervisor.forget(rid)
            self._by_tenant[job.request.tenant] -= 1
            self._by_user[user_key(job)] -= 1
            if not self._queue.push(job):
                job.fail(GenerationError("the batching manager is not running"))
            return False
        return True

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
        manager = self._manager
        if manager is not None:
            if cancel:
                manager.cancel_request(run.rid)
            # The manager keeps handlers of cancelled requests registered; drop ours.
            assert self._supervisor is not None
            self._supervisor.forget(run.rid)
        if not self._stopping:
            self._pump()

    def _loop_died(self, reason: str) -> None:
        """Fail every waiting and running ticket at once: their answers will not come."""
        error = GenerationError(reason)
        for job in self._queue.drain():
            job.fail(error)
        for run in list(self._running.values()):
            self._release(run, cancel=False)
            run.job.fail(error)

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
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            await supervisor.close()
        self.runner = None

"""``parley worker``: serves generation jobs from a Redis Stream on an inner generator.

Each worker is one consumer of the group ``workers`` on ``{queue}:jobs`` (layout and
wire format in :mod:`core.generation.fleet.jobs`). It runs up to ``worker.concurrency`` jobs at
once on its inner generator (``worker.backend``: ``local`` or ``echo``), which batches
them, and writes each job's text to the job's reply stream:

- **Coalesced writes** (:mod:`core.generation.fleet.replies`). One flusher writes every job's
  new text at most once per ``FLUSH_INTERVAL``, all jobs in one pipeline, so a reply
  costs one entry per flush, not per token. Each write is a script that first checks
  that this worker still owns the job at this attempt (a worker that stalled and lost
  its job writes nothing more) and answers whether the front end cancelled it.
- **Heartbeats and reclaims.** Every ``worker.heartbeat`` seconds a worker resets the
  idle time of the jobs it runs (``XCLAIM ... JUSTID``), so long generations are not
  stolen; every worker also runs ``XAUTOCLAIM`` for jobs idle longer than
  ``worker.claim_idle`` (their worker died) and runs them again, the delivery count
  being the attempt number.
- **Poison.** A job delivered more than ``worker.max_attempts`` times, or failing on its
  last attempt, is dead-lettered to ``{queue}:dead`` and its front end told; a
  malformed entry is dead-lettered at once. The worker keeps serving.
- **Stop.** The worker takes no new jobs, lets running ones finish for ``stop_grace``
  seconds, then hands the rest back (marks them idle, so another worker takes them at
  once).

With ``worker.http_port`` set, the worker also serves the OpenAI-compatible API
(:mod:`core.generation.openai.server`) on the same inner generator, and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from core.api_keys import ApiKeys
from core.config import BotSettings
from core.errors import ConfigError, GenerationError
from core.generation.base import Generator, backend_settings, generator_backends
from core.generation.fleet import worker_scripts as scripts
from core.generation.fleet.jobs import (
    GROUP,
    MalformedJob,
    QueuedJob,
    QueueKeys,
    dead_letter,
    decode_job,
)
from core.generation.fleet.replies import ReplyWriter, RunningJob
from core.generation.fleet.settings import FleetSettings, inner_settings
from core.lifecycle import ServiceBase, stop_signals
from core.metrics import WorkerMetrics
from core.redis_client import connect, load_scripts, redact, reply_text
from core.streams import closing

log = logging.getLogger(__name__)

READ_BLOCK = 0.5  # seconds one XREADGROUP waits; a stopping worker notices within it
SOCKET_TIMEOUT = READ_BLOCK + 5.0
ERROR_PAUSE = 1.0  # seconds a loop waits after Redis refused a command, before trying again
RECONNECT_POLL = 0.05  # seconds between tries while Redis cannot be reached


class Worker(ServiceBase):
    """A consumer of the generation queue; see the module docstring.

    ``inner`` replaces the generator ``worker.backend`` names (tests pass their own).
    """

    def __init__(
        self,
        settings: BotSettings,
        *,
        inner: Generator | None = None,
        metrics: WorkerMetrics | None = None,
        stop_grace: float = 10.0,
    ) -> None:
        self.settings = settings
        self.section = settings.worker
        if inner is None:
            name = self.section.backend
            if name == "redis":
                raise ConfigError(f"{settings.source}: worker.backend: a worker cannot "
                                  "serve its jobs on the redis backend itself")
            factory = generator_backends().get(name, where=f"{settings.source}: worker.backend")
            inner = factory(inner_settings(settings))
        self.inner = inner
        self.metrics = metrics or WorkerMetrics()
        self.stop_grace = stop_grace
        self.name = self.section.name or f"{socket.gethostname()}-{os.getpid()}"
        fleet = backend_settings(settings.generation, FleetSettings, source=settings.source)
        self.keys = QueueKeys(fleet.queue)
        self.where = redact(self.section.url)
        self.http_address: tuple[str, int] | None = None
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        # By entry and attempt: see RunningJob.key.
        self._running: dict[tuple[str, int], RunningJob] = {}
        self._writer: ReplyWriter | None = None
        self._slot_free = asyncio.Event()
        self._reclaim_now = asyncio.Event()
        self._stopping = False
        self._intake: list[asyncio.Task[None]] = []
        self._upkeep: list[asyncio.Task[None]] = []
        self._http: web.AppRunner | None = None
        self._inner_started = False

    @property
    def writer(self) -> ReplyWriter:
        """Writes the running jobs' replies; exists between start and stop."""
        if self._writer is None:
            raise RuntimeError("the worker is not started")
        return self._writer

    # -- lifecycle ---------------------------------------------------------------------

    async def _start(self) -> None:
        self._stopping = False
        client = connect(self.section.url, timeout=SOCKET_TIMEOUT,
                         where=f"{self.settings.source}: worker.url")
        self._client = client
        sources = {"reclaim": scripts.RECLAIM, "touch": scripts.TOUCH, "write": scripts.WRITE}
        try:
            self._scripts = await load_scripts(client, sources)
            self._writer = ReplyWriter(client, self.keys, self.name, self.where,
                                       self._scripts["write"].sha)
            await self._ensure_group()
        except (RedisError, OSError) as exc:
            raise GenerationError(f"worker: redis at {self.where}: {exc}") from exc
        await self.inner.start()
        self._inner_started = True
        if self.section.http_port is not None:
            await self._start_http()
        self._upkeep = [
            asyncio.create_task(self.writer.run(), name="parley-worker-flush"),
            asyncio.create_task(self._heartbeat_loop(), name="parley-worker-heartbeat"),
        ]
        self._intake = [
            asyncio.create_task(self._read_loop(), name="parley-worker-read"),
            asyncio.create_task(self._reclaim_loop(), name="parley-worker-reclaim"),
        ]
        log.info("worker %s: serving %s at %s (concurrency %d)", self.name, self.keys.jobs,
                 self.where, self.section.concurrency)

    async def _stop(self) -> None:
        self._stopping = True
        self._slot_free.set()
        self._reclaim_now.set()
        await _finish(self._intake)
        self._intake = []
        running = [r.task for r in self._running.values() if r.task is not None]
        if running:
            log.info("worker %s: waiting up to %g s for %d running jobs",
                     self.name, self.stop_grace, len(running))
            await asyncio.wait(running, timeout=self.stop_grace)
        for r in list(self._running.values()):
            r.halt("stopping")
        await asyncio.gather(
            *(r.task for r in list(self._running.values()) if r.task is not None),
            return_exceptions=True,
        )
        for task in self._upkeep:
            task.cancel()
        await _finish(self._upkeep)
        self._upkeep = []
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
            self.http_address = None
        if self._inner_started:
            self._inner_started = False
            await self.inner.stop()
        client, self._client = self._client, None
        self._scripts = {}
        if client is not None:
            await client.aclose()

    async def _start_http(self) -> None:
        from core.generation.openai.server import openai_app

        app = openai_app(self.inner, self.settings.generation.model,
                         metrics_render=self.metrics.render,
                         keys=ApiKeys(self.section.api_keys))
        # Cancelling the handler of a client that hung up is what stops its generation.
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        self._http = runner
        site = web.TCPSite(runner, self.section.http_host, self.section.http_port)
        await site.start()
        address = runner.addresses[0]
        self.http_address = (str(address[0]), int(address[1]))
        log.info("worker %s: HTTP on %s:%d", self.name, *self.http_address)

    # -- taking jobs ---------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        assert self._client is not None
        try:
            await self._client.xgroup_create(self.keys.jobs, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        # Listed in XINFO CONSUMERS from now on, not only once it has read a job.
        await self._client.xgroup_createconsumer(self.keys.jobs, GROUP, self.name)

    def _free(self) -> int:
        return self.section.concurrency - len(self._running)

    async def _read_loop(self) -> None:
        client = self._client
        assert client is not None
        while not self._stopping:
            free = self._free()
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                answer: Any = await client.xreadgroup(
                    GROUP, self.name, {self.keys.jobs: ">"}, count=free,
                    block=int(READ_BLOCK * 1000),
                )
                entries = [(reply_text(i), f, 1) for _k, batch in answer or () for i, f in batch]
                if entries:
                    await self._admit(entries)
            except (RedisError, OSError) as exc:
                await self._redis_trouble("read", exc)

    async def _reclaim_loop(self) -> None:
        client = self._client
        assert client is not None
        interval = min(self.section.claim_idle / 2, self.section.heartbeat)
        cursor = "0-0"
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._reclaim_now.wait()
            self._reclaim_now.clear()
            free = self._free()
            if self._stopping or free <= 0:
                continue
            try:
                cursor_raw, claimed = await self._scripts["reclaim"](
                    keys=[self.keys.jobs],
                    args=[GROUP, self.name, int(self.section.claim_idle * 1000), cursor, free],
                )
                cursor = reply_text(cursor_raw)
                entries = [(reply_text(i), _pairs(f), int(n)) for i, f, n in claimed]
                if entries:
                    self.metrics.reclaimed.inc(len(entries))
                    log.info("worker %s: reclaimed %d jobs", self.name, len(entries))
                    await self._admit(entries)
            except (RedisError, OSError) as exc:
                await self._redis_trouble("reclaim", exc)

    async def _redis_trouble(self, what: str, exc: Exception) -> None:
        log.warning("worker %s: %s at %s failed: %s", self.name, what, self.where, exc)
        if isinstance(exc, ResponseError) and "NOGROUP" not in str(exc):
            await asyncio.sleep(ERROR_PAUSE)  # Redis answers but refuses: do not spin
            return
        # The connection broke, or Redis lost its data (NOGROUP): it may have restarted
        # empty. Serve again as soon as it answers, with the group and scripts back.
        await self._resync()

    async def _resync(self) -> None:
        """Wait until Redis answers, then make sure the stream, the consumer group and
        the scripts exist (all idempotent); returns at once if they do."""
        assert self._client is not None
        tries = 0
        while not self._stopping:
            try:
                await self._ensure_group()
                for script in self._scripts.values():
                    await self._client.script_load(script.script)
            except (RedisError, OSError):
                tries += 1
                await asyncio.sleep(RECONNECT_POLL)
                continue
            if tries:
                log.info("worker %s: redis at %s answers again; serving", self.name, self.where)
            return

    async def _admit(self, entries: Sequence[tuple[str, dict[bytes, bytes], int]]) -> None:
        """Start the jobs of ``entries`` (id, fields, attempt) that are still wanted."""
        client = self._client
        assert client is not None
        max_attempts = self.section.max_attempts
        jobs: list[tuple[str, QueuedJob, int, bytes]] = []
        for entry_id, fields, attempt in entries:
            raw = fields.get(b"job", b"")
            try:
                job = decode_job(fields)
            except MalformedJob as exc:
                log.warning("worker %s: job %s is malformed: %s", self.name, entry_id, exc)
                await self._dead_letter(entry_id, raw, exc.request_id, attempt,
                                        f"malformed: {exc.reason}", "malformed")
                continue
            if attempt > max_attempts:
                await self._dead_letter(entry_id, raw, job.request.request_id, attempt,
                                        f"gave up after {attempt - 1} attempts", "attempts",
                                        job)
                continue
            jobs.append((entry_id, job, attempt, raw))
        if not jobs:
            return
        pipe = client.pipeline(transaction=False)
        for _, job, _, _ in jobs:
            pipe.exists(self.keys.cancel(job.request.request_id))
        cancelled = await pipe.execute()
        now = time.time()
        for (entry_id, job, attempt, raw), gone in zip(jobs, cancelled, strict=True):
            expired = attempt == 1 and job.deadline < now
            if gone or expired:
                outcome = "cancelled" if gone else "expired"
                log.info("worker %s: skipping %s job %s", self.name, outcome,
                         job.request.request_id)
                pipe = client.pipeline(transaction=False)
                pipe.xack(self.keys.jobs, GROUP, entry_id)
                pipe.xdel(self.keys.jobs, entry_id)
                await pipe.execute()
                self.metrics.jobs.labels(outcome).inc()
                continue
            r = RunningJob(entry_id, job, attempt, raw)
            for older in [o for o in self._running.values() if o.entry_id == entry_id]:
                # This worker reclaimed its own job (its heartbeats lapsed): the older
                # attempt lost it; it stops, and its cleanup touches only itself.
                older.halt("lost")
            self._running[r.key] = r
            self.metrics.running.inc()
            r.task = asyncio.create_task(self._serve(r), name=f"parley-job-{entry_id}")

    async def _dead_letter(
        self, entry_id: str, raw: bytes, request_id: str | None, attempts: int,
        reason: str, kind: str, job: QueuedJob | None = None,
    ) -> None:
        """Dead-letter a job (:func:`~core.generation.fleet.jobs.dead_letter`), log, count."""
        assert self._client is not None
        await dead_letter(self._client, self.keys, entry_id, raw, request_id=request_id,
                          attempts=attempts, reason=reason, worker=self.name,
                          ttl=self.section.dead_letter_ttl, job=job)
        log.warning("worker %s: dead-lettered job %s (%s): %s", self.name, entry_id,
                    request_id or "no id", reason)
        self.metrics.dead_letters.labels(kind).inc()
        self.metrics.jobs.labels("dead_lettered").inc()

    # -- running jobs --------------------------------------------------------------------

    async def _serve(self, r: RunningJob) -> None:
        try:
            self.writer.mark(r)  # an entry at once: the front end knows the job started
            async with closing(self.inner.stream(r.job.request)) as deltas:
                async for delta in deltas:
                    if delta.text:
                        r.pending.append(delta.text)
                    if delta.finish_reason is not None:
                        r.finish_reason = delta.finish_reason
                        break
                    self.writer.mark(r)
            if r.finish_reason is None:
                r.finish_reason = "stop"
            self.writer.mark(r)
            await r.written.wait()
            self.metrics.jobs.labels(r.outcome).inc()
        except asyncio.CancelledError:
            if r.stop_reason is None:
                raise
            await self._halted(r)
        except Exception as exc:
            await self._failed(r, exc)
        finally:
            self.writer.discard(r)
            if self._running.get(r.key) is r:
                del self._running[r.key]
                self.metrics.running.dec()
            self._slot_free.set()

    async def _halted(self, r: RunningJob) -> None:
        reason = r.stop_reason
        log.info("worker %s: job %s stopped: %s", self.name, r.request_id, reason)
        try:
            if reason == "cancelled":
                await self._ack(r)
            elif reason == "stopping":
                await self._hand_back(r)
        except (RedisError, OSError) as exc:
            log.warning("worker %s: job %s: %s at %s failed: %s", self.name, r.request_id,
                        reason, self.where, exc)
        outcome = {"stopping": "handed_back", "redis": "failed"}.get(reason or "", reason)
        self.metrics.jobs.labels(outcome or "failed").inc()

    async def _failed(self, r: RunningJob, exc: Exception) -> None:
        if not isinstance(exc, GenerationError):
            log.exception("worker %s: job %s failed", self.name, r.request_id)
        detail = str(exc) or type(exc).__name__
        try:
            if r.attempt >= self.section.max_attempts:
                await self._dead_letter(r.entry_id, r.raw, r.request_id, r.attempt,
                                        f"attempt {r.attempt} failed: {detail}", "attempts",
                                        r.job)
                return
            log.warning("worker %s: job %s attempt %d failed, handing it back: %s",
                        self.name, r.request_id, r.attempt, detail)
            await self._hand_back(r)
        except (RedisError, OSError) as err:
            log.warning("worker %s: job %s: hand-back at %s failed: %s", self.name,
                        r.request_id, self.where, err)
        self.metrics.jobs.labels("failed").inc()

    async def _ack(self, r: RunningJob) -> None:
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        pipe.xack(self.keys.jobs, GROUP, r.entry_id)
        pipe.xdel(self.keys.jobs, r.entry_id)
        await pipe.execute()

    async def _hand_back(self, r: RunningJob) -> None:
        """Make the job idle for ``claim_idle``, so the next reclaim (anyone's) takes it."""
        idle = int(self.section.claim_idle * 1000) + 1
        await self._scripts["touch"](
            keys=[self.keys.jobs, self.keys.cancel(r.request_id)],
            args=[GROUP, self.name, idle, r.entry_id, r.attempt],
        )
        self._reclaim_now.set()

    # -- heartbeats ---------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        client = self._client
        assert client is not None
        while True:
            await asyncio.sleep(self.section.heartbeat)
            running = [r for r in self._running.values() if r.stop_reason is None]
            if not running:
                continue
            args: list[Any] = [GROUP, self.name, 0]
            for r in running:
                args += [r.entry_id, r.attempt]
            keys = [self.keys.jobs, *(self.keys.cancel(r.request_id) for r in running)]
            try:
                statuses = await self._scripts["touch"](keys=keys, args=args)
            except (RedisError, OSError) as exc:
                log.warning("worker %s: heartbeat at %s failed: %s", self.name, self.where, exc)
                continue
            for r, status in zip(running, statuses, strict=True):
                if status == 1:
                    log.warning("worker %s: job %s was taken over by another worker",
                                self.name, r.request_id)
                    r.halt("lost")
                elif status == 2:
                    r.halt("cancelled")


async def _finish(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Wait for ``tasks`` to end, logging any that failed."""
    for task in tasks:
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("worker task %s failed", task.get_name())


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


async def run_worker(settings: BotSettings) -> None:
    """Serve jobs until SIGINT or SIGTERM (``parley worker CONFIG``)."""
    async with stop_signals() as stop, Worker(settings):
        await stop.wait()

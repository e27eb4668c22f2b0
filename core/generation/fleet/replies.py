"""What a ``parley worker`` writes back: the replies of its running jobs.

Each job's new text is marked dirty as it arrives; at most every ``FLUSH_INTERVAL`` one
pipeline writes every dirty job's text (and end), each through an owner-checked script,
so a reply costs one stream entry per flush rather than one per token, and a worker
that lost a job can never write into the attempt that took over.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.generation.base import FinishReason
from core.generation.fleet.jobs import GROUP, REPLY_TTL, QueuedJob, QueueKeys, Reply, encode_reply

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.015  # seconds between two writes of a job's text, at least

StopReason = Literal["cancelled", "lost", "stopping", "redis"]


@dataclass(eq=False)
class RunningJob:
    """One job this worker runs, and what of its reply is still to be written."""

    entry_id: str
    job: QueuedJob
    attempt: int
    raw: bytes
    pending: list[str] = field(default_factory=list)
    introduced: bool = False  # whether an entry of this attempt was written
    finish_reason: FinishReason | None = None
    written: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: str = "done"  # of the final write: done, lost or failed
    stop_reason: StopReason | None = None
    task: asyncio.Task[None] | None = None

    @property
    def request_id(self) -> str:
        return self.job.request.request_id

    @property
    def key(self) -> tuple[str, int]:
        """The job's entry and this attempt: a worker that reclaims its own entry (its
        heartbeats lapsed) runs a second attempt beside the first for a moment."""
        return self.entry_id, self.attempt

    def halt(self, reason: StopReason) -> None:
        """Stop generating this job (the first reason given is kept)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.task is not None and not self.task.done():
            self.task.cancel()


class ReplyWriter:
    """Coalesces the running jobs' replies into one Redis pipeline per flush."""

    def __init__(
        self, client: Redis, keys: QueueKeys, worker: str, where: str, write_sha: str
    ) -> None:
        self._client = client
        self.keys = keys
        self.name = worker
        self.where = where
        self._write_sha = write_sha
        self._dirty: dict[tuple[str, int], RunningJob] = {}
        self._dirty_event = asyncio.Event()

    def mark(self, r: RunningJob) -> None:
        """``r`` has something to write (text, its end, or its first entry)."""
        self._dirty[r.key] = r
        self._dirty_event.set()

    def discard(self, r: RunningJob) -> None:
        """Forget ``r``: it ended without a final write of this worker's."""
        if self._dirty.get(r.key) is r:
            del self._dirty[r.key]

    async def run(self) -> None:
        """Write marked replies until cancelled, at most once per FLUSH_INTERVAL."""
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            await self._dirty_event.wait()
            wait = last + FLUSH_INTERVAL - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._dirty_event.clear()
            batch, self._dirty = list(self._dirty.values()), {}
            last = loop.time()
            try:
                await self._flush(batch)
            except (RedisError, OSError) as exc:
                log.warning("worker %s: writing %d replies to %s failed: %s", self.name,
                            len(batch), self.where, exc)
                for r in batch:
                    r.halt("redis")

    async def _flush(self, batch: list[RunningJob]) -> None:
        """One pipeline: each job's new text (and end, if it ended), owner-checked."""
        client = self._client
        # EVALSHA without the pipeline's script registration, which would cost a SCRIPT
        # EXISTS round trip per flush; the scripts are loaded at start and after a
        # Redis restart (see Worker._redis_trouble).
        sha = self._write_sha
        pipe = client.pipeline(transaction=False)
        finals = []
        for r in batch:
            final = r.finish_reason is not None
            finals.append(final)
            reply = Reply(r.attempt, "".join(r.pending), r.finish_reason,
                          worker=None if r.introduced else self.name)
            r.pending.clear()
            r.introduced = True
            fields = [x for pair in encode_reply(reply).items() for x in pair]
            rid = r.request_id
            pipe.evalsha(
                sha, 3, self.keys.jobs, self.keys.reply(rid), self.keys.cancel(rid),
                GROUP, self.name, r.entry_id, r.attempt, int(final), REPLY_TTL, *fields,
            )
        results = await pipe.execute()
        # A job may have ended while this flush was on its way: only what was final
        # when the pipeline was built has been written as final.
        for r, final, status in zip(batch, finals, results, strict=True):
            if final:
                r.outcome = "lost" if status == 1 else "done"
                r.written.set()
            elif status == 1:
                r.halt("lost")
            elif status == 2:
                r.halt("cancelled")

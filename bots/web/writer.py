"""A reply's events on their way into the conversation's reply log
(:mod:`bots.web.resume`): batched, less what a batch makes moot (:func:`compact`).
"""

from __future__ import annotations

import asyncio
import math

from bots.web.resume import TERMINAL, Entry, ReplyLog

# How long a reply's words may wait for more before they are appended: one append (a
# Redis call, a frame per socket) per batch instead of one per event. A reply that ends
# within it is one append of the user's message and the answer; a streamed one is
# shown 20 times a second, which reads as smooth.
LINGER_SECONDS = 0.05
# How long the start of a reply (the user's message, the typing indicator) may wait for
# the reply's first words or its end: a quick reply is then one append even when the
# server is busy, and a slow one shows its typing indicator after this (the widget
# shows the user's own message at once anyway).
QUIET_SECONDS = 0.2
_QUIET = frozenset({"user", "typing"})
# Events that only lead up to the answer: a reply's end (TERMINAL) carries the whole
# text, so those in the same batch as it need not be kept.
_LEADING = frozenset({"typing", "delta", "reset"})


def compact(batch: list[Entry]) -> list[Entry]:
    """``batch`` (events not yet appended, so seen by nobody) as the widget needs it:
    what leads up to a reply's end in the same batch is left out (the end carries the
    whole text), a typing event followed by its reply's text too, and consecutive
    deltas become one. Whoever reads the log sees the same conversation, in fewer
    numbers."""
    if len(batch) < 2:
        return batch
    ended = {e["message_id"] for e in batch if e["kind"] in TERMINAL}
    out: list[Entry] = []
    for entry in batch:
        kind = entry["kind"]
        if kind in _LEADING and entry["message_id"] in ended:
            continue
        if out and kind in _LEADING:
            prev = out[-1]
            if prev["message_id"] == entry["message_id"]:
                if prev["kind"] == "typing":
                    out[-1] = entry
                    continue
                if kind == "delta" and prev["kind"] == "delta" and (
                        prev["action"] == entry["action"]):
                    out[-1] = {**prev, "text": prev["text"] + entry["text"]}
                    continue
        out.append(entry)
    return out


def _tick(now: float, linger: float) -> float:
    """When a batch begun at ``now`` goes out: between ``linger / 2`` and ``linger`` later,
    on a grid of ``linger / 2`` steps. All replies' batches due at one step go out in
    one event-loop turn, so Redis gets them in one pipelined write (one system call on
    each side) instead of one each."""
    step = linger / 2
    return (math.floor(now / step) + 2) * step


class ReplyWriter:
    """Appends one reply's events to the log in order, without making the reply wait.

    An event that ends the reply is appended at once with whatever waits before it;
    the reply's words wait up to ``linger`` seconds for company, its start (the user's
    message, typing) up to ``quiet`` seconds for its first words (see :func:`_tick`),
    and events written while an append is on its way go together in the next one. Each
    batch is :func:`compact`: a reply that ends within ``linger`` of its first words
    costs one append (one round trip to Redis, one frame to each socket) of two entries,
    the user's message and the answer; a streamed one about one per ``linger``, never
    one per delta. A failed append is raised by the next :meth:`write` or by
    :meth:`drain`.
    """

    def __init__(self, log: ReplyLog, ref: str, *, linger: float = LINGER_SECONDS,
                 quiet: float = QUIET_SECONDS) -> None:
        self.log = log
        self.ref = ref
        self.linger = linger
        self.quiet = quiet
        self._pending: list[Entry] = []
        self._flushing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._quiet = False  # the timer is the quiet one
        self._error: Exception | None = None

    def write(self, event: Entry) -> None:
        """Queue ``event`` for the log."""
        if self._error is not None:
            raise self._error
        self._pending.append(event)
        if self._flushing is not None and not self._flushing.done():
            return  # the append on its way takes this one next
        kind = event["kind"]
        if kind in TERMINAL:
            self._flush_now()
        elif self._timer is None or (self._quiet and kind not in _QUIET):
            quiet = kind in _QUIET
            loop = asyncio.get_running_loop()
            due = _tick(loop.time(), self.quiet if quiet else self.linger)
            if self._timer is not None:
                if self._timer.when() <= due:
                    self._quiet = False  # due soon enough for words too
                    return
                self._timer.cancel()
            self._timer = loop.call_at(due, self._flush_now)
            self._quiet = quiet

    def _flush_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._quiet = False
        if self._pending and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending and self._error is None:
            batch, self._pending = self._pending, []
            try:
                await self.log.append(self.ref, compact(batch))
            except Exception as exc:
                self._error = exc

    async def drain(self) -> None:
        """Wait until everything written is in the log."""
        self._flush_now()
        if self._flushing is not None:
            await self._flushing
        if self._error is not None:
            raise self._error

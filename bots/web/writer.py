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


# Steps of the batching grid per linger (see _tick).
GRID_STEPS = 5


def _tick(now: float, linger: float) -> float:
    """When a batch begun at ``now`` goes out: between ``linger * 4/5`` and ``linger``
    later, on a grid of ``linger / 5`` steps. All replies' batches due at one step go
    out in one event-loop turn, so Redis gets them in one pipelined write (one system
    call on each side) instead of one each.

    Why not a coarser grid (fewer timers): a reply's words should wait for its end as
    long as the promise allows. Under load a reply's end comes tens of milliseconds
    after its words (memory's write is queued on a busy loop); with the ``linger / 2``
    grid of before, words went out after 25-50 ms, and a reply whose end came 40 ms
    after its words took two appends (two Redis scripts, two frames and ``send``
    system calls per socket) one time in three instead of never. A timer per 10 ms
    step is nothing beside that."""
    step = linger / GRID_STEPS
    return (math.floor(now / step) + GRID_STEPS) * step


class Ticks:
    """When the waiting batches of many writers go out: the writers due at one step of
    :func:`_tick`'s grid share one timer, instead of each arming one (and, as a reply's
    words or end come, cancelling it) twice a reply. One per hub: its writers' batches
    due together go out in one event-loop turn anyway."""

    __slots__ = ("_due",)

    def __init__(self) -> None:
        self._due: dict[float, set[ReplyWriter]] = {}

    def add(self, writer: ReplyWriter, due: float) -> None:
        """Flush ``writer`` at ``due`` (a time on the grid), unless it leaves before."""
        writers = self._due.get(due)
        if writers is None:
            writers = self._due[due] = set()
            asyncio.get_running_loop().call_at(due, self._fire, due)
        writers.add(writer)

    def discard(self, writer: ReplyWriter, due: float) -> None:
        """``writer`` no longer waits for ``due``."""
        writers = self._due.get(due)
        if writers is not None:
            writers.discard(writer)

    def _fire(self, due: float) -> None:
        for writer in self._due.pop(due, ()):
            writer._flush_now()


class ReplyWriter:
    """Appends one reply's events to the log in order, without making the reply wait.

    The reply's words wait up to ``linger`` seconds for company, its start (the user's
    message, typing) up to ``quiet`` seconds for its first words (see :func:`_tick`),
    and events written while an append is on its way go together in the next one. An
    event that ends the reply goes out with whatever waits before it when the reply's
    task calls :meth:`drain`, as it does right after (in that task: no task of its own;
    within ``linger`` anyway). Each batch is :func:`compact`: a reply that ends within
    ``linger`` of its first words costs one append (one round trip to Redis, one frame
    to each socket) of two entries, the user's message and the answer; a streamed one
    about one per ``linger``, never one per delta. A failed append is raised by the
    next :meth:`write` or by :meth:`drain`. ``ticks``: shared with the hub's other
    writers (one of its own without).
    """

    __slots__ = ("_due", "_error", "_flushing", "_pending", "_quiet", "_ticks", "linger",
                 "log", "quiet", "ref")

    def __init__(self, log: ReplyLog, ref: str, *, linger: float = LINGER_SECONDS,
                 quiet: float = QUIET_SECONDS, ticks: Ticks | None = None) -> None:
        self.log = log
        self.ref = ref
        self.linger = linger
        self.quiet = quiet
        self._ticks = ticks if ticks is not None else Ticks()
        self._pending: list[Entry] = []
        # The append on its way: a task (a batch that came due), or drain()'s own.
        self._flushing: asyncio.Future[None] | None = None
        self._due: float | None = None  # when the waiting batch goes out (on _ticks)
        self._quiet = False  # it is due as the quiet start of the reply
        self._error: Exception | None = None

    def write(self, event: Entry) -> None:
        """Queue ``event`` for the log."""
        if self._error is not None:
            raise self._error
        self._pending.append(event)
        if self._flushing is not None and not self._flushing.done():
            return  # the append on its way takes this one next
        quiet = event["kind"] in _QUIET
        if self._due is None or (self._quiet and not quiet):
            due = _tick(asyncio.get_running_loop().time(), self.quiet if quiet else self.linger)
            if self._due is not None:
                if self._due <= due:
                    self._quiet = False  # due soon enough for words too
                    return
                self._ticks.discard(self, self._due)
            self._ticks.add(self, due)
            self._due = due
            self._quiet = quiet

    def _unschedule(self) -> None:
        if self._due is not None:
            self._ticks.discard(self, self._due)
            self._due = None
            self._quiet = False

    def _flush_now(self) -> None:
        """The waiting batch came due (:class:`Ticks`)."""
        self._due = None
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
        """Append what waits, and wait until everything written is in the log."""
        self._unschedule()
        flushing = self._flushing
        if flushing is not None and not flushing.done():
            await flushing  # it takes what waits, in order
        elif self._pending:
            # Appended from the caller's task: a task of its own would cost more than
            # the append's own Python, for nothing (the caller waits for it anyway).
            done = self._flushing = asyncio.get_running_loop().create_future()
            try:
                await self._flush()
            finally:
                if not done.done():
                    done.set_result(None)
        if self._error is not None:
            raise self._error

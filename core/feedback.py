"""``parley feedback``: every rating users gave the bot's replies, for the operator.

A channel that lets users rate replies (the web widget's thumbs up/down with an optional
comment) keeps each rating with the turn it rates: the user's message and the reply.
This module is the channel-independent side: the record an export holds, the protocol
an adapter implements to hand its ratings out without running (:class:`KeepsFeedback`),
and the JSON Lines / CSV writers. Nothing here knows where an adapter keeps them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Literal, Protocol, TextIO, runtime_checkable

from core.config import BotSettings
from core.errors import ConfigError

Format = Literal["jsonl", "csv"]


@dataclass(frozen=True, slots=True)
class Rated:
    """One rating of one reply, with the exchange it rates."""

    bot: str
    channel: str
    conversation_id: str
    message_id: str  # the user message the rated reply answered
    user_id: str
    rating: str  # "up" or "down"
    comment: str
    prompt: str  # that user message
    reply: str  # the rated reply
    at: float  # when it was given (unix seconds)


class FeedbackSource(Protocol):
    """An adapter's ratings, opened for reading."""

    async def start(self) -> None:
        """Connect."""

    async def stop(self) -> None:
        """Disconnect."""

    async def all_feedback(self, since: float | None = None) -> list[Rated]:
        """Every rating kept (given at ``since`` or later), oldest first."""


@runtime_checkable
class KeepsFeedback(Protocol):
    """An adapter whose users rate replies."""

    def feedback_source(self) -> FeedbackSource | None:
        """Its ratings, readable from another process (None: they live in the running
        bot's process, with the embedded memory backend)."""


async def collect(settings: BotSettings, since: float | None = None) -> list[Rated]:
    """Every rating the bot's adapters keep, oldest first (adapters are built, not
    started); :class:`ConfigError` if none of them keeps ratings out of process."""
    from core.app import build_adapters

    adapters = build_adapters(settings) if settings.adapters else []
    sources = [source for adapter in adapters if isinstance(adapter, KeepsFeedback)
               if (source := adapter.feedback_source()) is not None]
    if not sources:
        raise ConfigError(
            f"{settings.source}: adapters: no adapter keeps ratings where this command can "
            "read them (the web channel does, with memory.backend = \"redis\")")
    found: list[Rated] = []
    async with AsyncExitStack() as stack:
        for source in sources:
            await source.start()
            stack.push_async_callback(source.stop)
            found += await source.all_feedback(since)
    return sorted(found, key=lambda r: r.at)


COLUMNS: Sequence[str] = [f.name for f in fields(Rated)]


def iso_time(at: float) -> str:
    """``at`` as an ISO 8601 UTC time, to the millisecond."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def write(records: Iterable[Rated], fmt: Format, out: TextIO) -> int:
    """Write ``records`` to ``out`` as JSON Lines or CSV (with a header); times in ISO
    8601 UTC. Returns how many were written."""
    count = 0
    writer = csv.DictWriter(out, fieldnames=COLUMNS) if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    for record in records:
        row = {**asdict(record), "at": iso_time(record.at)}
        if writer is not None:
            writer.writerow(row)
        else:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    return count

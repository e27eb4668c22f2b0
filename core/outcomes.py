"""How the handling of a message ends, for users and for the counters: what users are
told when something behind the bot fails, the outcome a reply stream is counted under,
and the last event of a stream for channels that don't stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from core.metrics import Metrics
from core.moderation.base import Action
from core.streams import closing
from core.types import ReplyEvent, ReplyKind


@dataclass(frozen=True, slots=True)
class Apologies:
    """What users are told when something behind the bot fails. Short and polite."""

    memory: str = (
        "Sorry, I'm having trouble remembering our conversation right now. "
        "Please try again in a moment."
    )
    busy: str = "Sorry, I'm very busy right now. Please try again in a moment."
    generation: str = "Sorry, something went wrong while I was thinking. Please try again."
    empty: str = "Sorry, I don't have an answer to that."
    plugin: str = "Sorry, something went wrong on my side. Please try again."
    slow_down: str = "You're sending messages faster than I can answer. Please slow down."
    # A channel's own failure while answering (an adapter's bug, its store failing).
    internal: str = "Sorry, something went wrong. Please try again."


# Looked up once: reading a member off an enum class costs more than the test, and
# every message's outcome is asked.
_FINAL, _ERROR, _ALLOW = ReplyKind.FINAL, ReplyKind.ERROR, Action.ALLOW


def outcome(event: ReplyEvent) -> str:
    """What a reply stream that ended in ``event`` is counted as (``messages`` metric)."""
    if event.code == "duplicate":
        return "duplicate"
    if event.kind is _FINAL:
        return "answered"
    if event.kind is _ERROR:
        return "error"
    if event.code == "command":
        return "command"
    return "blocked" if event.action != _ALLOW else "notice"


async def collect(events: AsyncIterator[ReplyEvent]) -> ReplyEvent:
    """Drain a reply stream and return its last event (for channels that don't stream)."""
    last = ReplyEvent(ReplyKind.ERROR, "no reply", code="no_reply")
    async with closing(events) as stream:
        async for event in stream:
            last = event
    return last


def plugin_failure_counter(metrics: Metrics, bot: str) -> Callable[[str, str, BaseException], None]:
    """What a plugin registry calls on a plugin's failure: count it for ``bot``."""

    def count(plugin: str, what: str, exc: BaseException) -> None:
        metrics.plugin_failures.labels(bot, plugin).inc()

    return count

"""Streaming a reply by editing a message, for platforms that have no streaming API.

Telegram and Discord show a reply as it is made by sending a message and editing it as
text arrives. What they share lives here; what differs is passed in: a :class:`Surface`
(send, edit, delete, typing, supplied by the platform, which also paces and retries its
own calls) and :class:`StreamLimits` (message length and how it is counted, how often to
edit, how often to repeat "typing").

:class:`StreamingReply` renders one engine reply (a stream of ``ReplyEvent``):

- ``typing`` while nothing is shown yet, repeated every ``typing_interval`` seconds;
- ``delta``: the reply grows by edits, at most one every ``edit_interval`` seconds, and an
  edit only when the text shown changed; past ``max_length`` it continues in new messages
  (split by :func:`bots.base.split_message`: never inside a grapheme cluster, inline
  formatting or, without closing and reopening it, a code block);
- ``reset``: what was shown is replaced (a placeholder until the new text arrives);
- ``final``, ``notice``, ``error``: the messages are made to show exactly that text.

Everything the platform has confirmed is in :attr:`StreamingReply.shown`: a delivery that
failed part-way can be finished later with :meth:`StreamingReply.finish`, editing the
messages already sent instead of sending them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from bots.base import split_message
from core.streams import closing
from core.types import ReplyEvent, ReplyKind

log = logging.getLogger(__name__)

H = TypeVar("H")
# What replaces a reply that is starting over, until its new text arrives.
RESET_PLACEHOLDER = "…"


class Surface(Protocol[H]):
    """Where one reply is shown: a chat, as the platform adapter exposes it.

    ``H`` is the platform's handle of a sent message (Telegram: a message id). Each call
    returns once the platform confirmed it, waiting for the platform's rate limits as
    told; it raises if the message could not be delivered.
    """

    async def send(self, text: str) -> H:
        """Send a new message with ``text``; its handle."""

    async def edit(self, handle: H, text: str) -> None:
        """Make the message ``handle`` show ``text``."""

    async def delete(self, handle: H) -> None:
        """Remove the message ``handle``."""

    async def typing(self) -> None:
        """Show "typing..." for a few seconds."""


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """A platform's limits, as parameters (see the module docstring)."""

    max_length: int  # of one message, in ``length`` units
    length: Callable[[str], int] = len
    edit_interval: float = 1.0  # seconds between two updates of a streamed reply
    typing_interval: float = 4.0  # seconds between two "typing" actions
    markdown: bool = True  # split Markdown-aware (see split_message)

    def split(self, text: str) -> list[str]:
        """``text`` as the messages that show it."""
        return split_message(text, self.max_length, length=self.length, markdown=self.markdown)


@dataclass(slots=True)
class Shown(Generic[H]):
    """A message the platform confirmed, and the text it shows."""

    handle: H
    text: str


class StreamingReply(Generic[H]):
    """Renders one reply on a :class:`Surface`; see the module docstring."""

    def __init__(
        self,
        surface: Surface[H],
        limits: StreamLimits,
        *,
        streaming: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.surface = surface
        self.limits = limits
        self.streaming = streaming
        self.shown: list[Shown[H]] = []
        self.text: str | None = None  # the whole reply, once the final event came
        self._clock = clock
        self._target = ""
        self._dirty = asyncio.Event()
        self._last_update = float("-inf")
        self._typing: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False

    async def render(self, events: AsyncIterator[ReplyEvent]) -> str | None:
        """Show the reply ``events`` make; the final text shown (None: nothing to show).

        Raises what the surface raises for the final text; :attr:`shown` then says what
        the user sees, and :meth:`finish` can complete it.
        """
        final: str | None = None
        completed = False
        try:
            async with closing(events) as stream:
                async for event in stream:
                    if event.kind is ReplyKind.TYPING:
                        self._start_typing()
                    elif event.kind is ReplyKind.DELTA:
                        self._target += event.text
                        self._changed()
                    elif event.kind is ReplyKind.RESET:
                        self._target = ""
                        if self.shown:
                            self._changed()
                    elif event.is_last:
                        final = event.text or None
                        break
            completed = True
        finally:
            await self._stop_background(graceful=completed)
        if final is None and self._target.strip():
            final = self._target  # a stream cut short keeps what it showed, completed
        if final is None:
            return None
        self.text = final
        await self.finish(final)
        return final

    async def finish(self, text: str) -> None:
        """Make the messages show exactly ``text``: edit, send the rest, delete extras."""
        await self._pace()
        parts = self.limits.split(text)
        await self._sync(parts)
        for extra in self.shown[len(parts) :]:
            await self.surface.delete(extra.handle)
        del self.shown[len(parts) :]

    # -- streaming ----------------------------------------------------------------------

    def _changed(self) -> None:
        if not self.streaming:
            return
        self._dirty.set()
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="streaming-reply")

    async def _flush_loop(self) -> None:
        try:
            while True:
                await self._dirty.wait()
                if self._closing:
                    return
                await self._pace()
                if self._closing:
                    return
                self._dirty.clear()
                target = self._target
                if target.strip():
                    await self._sync(self.limits.split(target))
                elif self.shown:
                    await self._sync([RESET_PLACEHOLDER])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The final update tries again; until then the user sees the last good edit.
            log.debug("streaming update failed, waiting for the final text: %s", exc)

    async def _pace(self) -> None:
        wait = self._last_update + self.limits.edit_interval - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _sync(self, parts: list[str]) -> None:
        """Bring the shown messages up to ``parts`` (extra shown messages are left)."""
        for index, part in enumerate(parts):
            if index < len(self.shown):
                if self.shown[index].text != part:
                    await self.surface.edit(self.shown[index].handle, part)
                    self.shown[index].text = part
                    self._last_update = self._clock()
            else:
                handle = await self.surface.send(part)
                self.shown.append(Shown(handle, part))
                self._last_update = self._clock()
                self._stop_typing()

    # -- typing -------------------------------------------------------------------------

    def _start_typing(self) -> None:
        if self._typing is None and not self.shown:
            self._typing = asyncio.create_task(self._typing_loop(), name="typing")

    async def _typing_loop(self) -> None:
        while True:
            try:
                await self.surface.typing()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("typing action failed: %s", exc)  # cosmetic: the reply goes on
            await asyncio.sleep(self.limits.typing_interval)

    def _stop_typing(self) -> None:
        if self._typing is not None:
            self._typing.cancel()
            self._typing = None

    async def _stop_background(self, *, graceful: bool) -> None:
        """Stop typing and streaming; ``graceful`` lets an update in flight complete, so
        :attr:`shown` matches what the platform confirmed."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None and graceful:
            self._closing = True
            self._dirty.set()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        tasks = [t for t in (self._typing, flusher) if t is not None]
        self._typing = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

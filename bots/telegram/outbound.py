"""Calls to Telegram that respect its limits: pacing, 429s, retries, plain-text fallback.

Every send, edit and delete waits for a slot in its chat (one a second; one every three
in a group) and in the bot's global budget (30 a second). A 429 holds the chat for the
``retry_after`` Telegram names and the same call is made again; network errors and 5xx
are retried with backoff. Calls to one chat are made one at a time by the adapter (one
reply after the other), so waiting and retrying never reorder them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from telegram import Bot, Message
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest, NetworkError, RetryAfter

from bots.telegram.config import TelegramLimits
from bots.telegram.markup import to_html

log = logging.getLogger(__name__)

T = TypeVar("T")
_GLOBAL = "global"
_PRUNE_AT = 10_000  # chats with a slot kept, before the quiet ones are forgotten


class Pacer:
    """Slots for calls, per chat and global, handed out in the order they are asked for.

    Each key has a minimum interval between two calls; a call takes the first moment
    that is free for its chat and for the global budget, and reserves it at once, so
    concurrent callers never get the same slot.
    """

    def __init__(self, limits: TelegramLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._clock = clock
        self._next: dict[int | str, float] = {}

    async def slot(self, chat_id: int | None, *, group: bool) -> None:
        """Wait for the next free slot of ``chat_id`` (None: the global budget only)."""
        now = self._clock()
        intervals: dict[int | str, float] = {_GLOBAL: 1.0 / self.limits.global_per_second}
        if chat_id is not None:
            intervals[chat_id] = (self.limits.group_interval if group
                                  else self.limits.chat_interval)
        if len(self._next) > _PRUNE_AT:
            # Chats long quiet need no slot kept: their next call is free anyway.
            self._next = {k: v for k, v in self._next.items() if v > now}
        at = max(now, *(self._next.get(key, now) for key in intervals))
        for key, interval in intervals.items():
            self._next[key] = at + interval
        if at > now:
            await asyncio.sleep(at - now)

    def hold(self, chat_id: int, seconds: float) -> None:
        """Telegram said to wait: no call to ``chat_id`` for ``seconds``."""
        until = self._clock() + seconds
        self._next[chat_id] = max(self._next.get(chat_id, until), until)


async def call(
    pacer: Pacer,
    chat_id: int | None,
    request: Callable[[], Awaitable[T]],
    *,
    group: bool,
    what: str,
) -> T:
    """Make ``request`` within the limits, again after a 429 or a passing failure."""
    limits = pacer.limits
    failures = 0
    while True:
        await pacer.slot(chat_id, group=group)
        try:
            return await request()
        except RetryAfter as exc:
            wait = _seconds(exc.retry_after)
            if wait > limits.max_retry_after:
                raise
            log.info("telegram: %s to chat %s: 429, waiting %.2f s", what, chat_id, wait)
            if chat_id is not None:
                pacer.hold(chat_id, wait)
            else:
                await asyncio.sleep(wait)
        except BadRequest:
            raise  # the request itself is wrong: the same again would fail again
        except NetworkError as exc:  # includes timeouts and 5xx answers
            failures += 1
            if failures > limits.max_retries:
                raise
            delay = limits.retry_backoff * 2 ** (failures - 1)
            log.info("telegram: %s to chat %s failed (%s); retry %d in %.2f s",
                     what, chat_id, exc, failures, delay)
            await asyncio.sleep(delay)


class TelegramChat:
    """One chat (or forum topic) as a :class:`bots.streaming.Surface` of message ids."""

    def __init__(
        self,
        bot: Bot,
        pacer: Pacer,
        chat_id: int,
        *,
        group: bool,
        thread_id: int | None = None,
        reply_to: int | None = None,
        markdown: bool = True,
    ) -> None:
        self.bot = bot
        self.pacer = pacer
        self.chat_id = chat_id
        self.group = group
        self.thread_id = thread_id
        self.reply_to = reply_to  # the first message answers this one (in groups)
        self.markdown = markdown

    async def send(self, text: str) -> int:
        """Send ``text`` (formatted, or plain if Telegram cannot parse it); its id."""
        extra: dict[str, Any] = {}
        if self.thread_id is not None:
            extra["message_thread_id"] = self.thread_id
        if self.reply_to is not None:
            extra["reply_to_message_id"] = self.reply_to
            extra["allow_sending_without_reply"] = True

        async def send(**format: Any) -> Message:
            return await self.bot.send_message(self.chat_id, **format, **extra)

        message = await self._formatted(text, send, "sendMessage")
        self.reply_to = None
        return message.message_id

    async def edit(self, handle: int, text: str) -> None:
        """Make message ``handle`` show ``text``."""

        async def edit(**format: Any) -> Any:
            return await self.bot.edit_message_text(chat_id=self.chat_id, message_id=handle,
                                                    **format)

        try:
            await self._formatted(text, edit, "editMessageText")
        except BadRequest as exc:
            # Two Markdown texts can render alike; the message shows what it should.
            if "not modified" not in exc.message.lower():
                raise

    async def delete(self, handle: int) -> None:
        """Remove message ``handle``."""
        await call(self.pacer, self.chat_id,
                   lambda: self.bot.delete_message(self.chat_id, handle),
                   group=self.group, what="deleteMessage")

    async def typing(self) -> None:
        """Show "typing..."; cosmetic, so it takes no slot of the chat and is not retried."""
        await self.pacer.slot(None, group=self.group)
        await self.bot.send_chat_action(self.chat_id, ChatAction.TYPING,
                                        message_thread_id=self.thread_id)

    async def _formatted(
        self, text: str, request: Callable[..., Awaitable[T]], what: str
    ) -> T:
        if self.markdown:
            try:
                return await call(
                    self.pacer, self.chat_id,
                    lambda: request(text=to_html(text), parse_mode=ParseMode.HTML),
                    group=self.group, what=what)
            except BadRequest as exc:
                if "can't parse entities" not in exc.message.lower():
                    raise
                log.debug("telegram: formatting refused (%s); sending plain text", exc)
        return await call(self.pacer, self.chat_id, lambda: request(text=text),
                          group=self.group, what=what)


def _seconds(value: int | float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)

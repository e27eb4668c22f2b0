"""Where a reply is shown on Discord: a channel, or a slash command's response.

Both are :class:`bots.streaming.Surface`\\ s. Everything they send carries
``AllowedMentions.none()``: text the model wrote can never ping anyone, whatever it
contains (``@everyone``, ``<@id>``, a role). Each call waits out rate limits: discord.py
sleeps through a 429 itself and gives up after five in a row; :func:`retrying` then keeps
going, until ``send_timeout``. A retried send carries the same nonce (``enforce_nonce``), so
Discord creates the message once even if an attempt did reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import discord

log = logging.getLogger(__name__)

T = TypeVar("T")
NO_PINGS = discord.AllowedMentions.none()


async def retrying(call: Callable[[], Awaitable[T]], *, within: float) -> T:
    """``call()``, again after a 429 or a 5xx until ``within`` seconds have passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    attempt = 0
    while True:
        try:
            return await call()
        except discord.HTTPException as exc:
            if exc.status != 429 and exc.status < 500:
                raise
            delay = _retry_after(exc) or min(0.5 * 2**attempt, 10.0)
            if loop.time() + delay > deadline:
                raise
            log.info("discord: %s %s, trying again in %.2f s", exc.status, exc.text, delay)
            await asyncio.sleep(delay)
            attempt += 1


def _retry_after(exc: discord.HTTPException) -> float | None:
    response: Any = exc.response
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class ChannelSurface:
    """A reply in a channel, DM or thread; its first message replies to ``reference``."""

    def __init__(
        self,
        channel: discord.abc.Messageable,
        *,
        reference: discord.Message | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.channel = channel
        self.reference = reference
        self.timeout = timeout

    async def send(self, text: str) -> discord.Message:
        """Post ``text`` as a new message."""
        reference = self.reference.to_reference(fail_if_not_exists=False) if (
            self.reference is not None) else None
        self.reference = None  # only the first part is a reply
        nonce = secrets.token_hex(8)
        extra: dict[str, Any] = {"reference": reference} if reference is not None else {}
        return await retrying(
            lambda: self.channel.send(text, allowed_mentions=NO_PINGS, nonce=nonce,
                                      mention_author=False, **extra),
            within=self.timeout,
        )

    async def edit(self, handle: discord.Message, text: str) -> None:
        """Make the message ``handle`` show ``text``."""
        await retrying(lambda: handle.edit(content=text, allowed_mentions=NO_PINGS),
                       within=self.timeout)

    async def delete(self, handle: discord.Message) -> None:
        """Remove the message ``handle`` (already gone is fine)."""
        with contextlib.suppress(discord.NotFound):
            await retrying(handle.delete, within=self.timeout)

    async def typing(self) -> None:
        """Show "typing..." (Discord shows it for 10 seconds)."""
        await self.channel.typing()


_ORIGINAL = None  # the handle of a slash command's own response message


class InteractionSurface:
    """The response to a deferred slash command: its first message, then follow-ups."""

    def __init__(self, interaction: discord.Interaction[Any], *, timeout: float = 120.0) -> None:
        self.interaction = interaction
        self.timeout = timeout
        self._original_used = False

    async def send(self, text: str) -> discord.WebhookMessage | None:
        """The first part fills the deferred response; later parts are follow-ups."""
        if not self._original_used:
            self._original_used = True
            await retrying(
                lambda: self.interaction.edit_original_response(
                    content=text, allowed_mentions=NO_PINGS),
                within=self.timeout,
            )
            return _ORIGINAL
        return await retrying(
            lambda: self.interaction.followup.send(text, allowed_mentions=NO_PINGS, wait=True),
            within=self.timeout,
        )

    async def edit(self, handle: discord.WebhookMessage | None, text: str) -> None:
        """Make the response (or a follow-up) show ``text``."""
        if handle is None:
            await retrying(lambda: self.interaction.edit_original_response(
                content=text, allowed_mentions=NO_PINGS), within=self.timeout)
        else:
            await retrying(lambda: handle.edit(content=text, allowed_mentions=NO_PINGS),
                           within=self.timeout)

    async def delete(self, handle: discord.WebhookMessage | None) -> None:
        """Remove the response or a follow-up."""
        with contextlib.suppress(discord.NotFound):
            if handle is None:
                await self.interaction.delete_original_response()
            else:
                await handle.delete()

    async def typing(self) -> None:
        """Nothing: a deferred response already shows "thinking..."."""

    @property
    def answered(self) -> bool:
        """Whether the deferred response has been given its text."""
        return self._original_used

"""Rolling summaries: conversations longer than the memory window keep what fell out of it.

After each stored reply, a conversation whose window is full and whose oldest turns are
not yet summarised gets its summary brought up to date in the background: the old
summary and the turns not yet in it (all but the newest exchange) go to the bot's
generator (as tenant ``{bot}:summary``, one request at a time, so it never crowds
out users' replies), and the result is kept in the conversation's plugin state. The
context provider puts the summary into the prompt; a conversation never waits for it.
``/forget`` deletes the summaries of every conversation the user was in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field

from core.generation.base import ChatMessage, GenerationRequest, SamplingParams
from core.plugins import AddContext, Exchange, Plugin
from core.redis_client import key_part
from core.types import ConversationKey, IncomingMessage, Turn

NAME = "summary"

log = logging.getLogger(__name__)


class Config(BaseModel):
    """``[plugins.summary]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=160, ge=16, le=1024)
    queue: int = Field(default=64, ge=1)  # conversations waiting; beyond, skipped this time
    instructions: str = (
        "Summarise the conversation below for the assistant's own memory in at most five "
        "short sentences: who the user is, what they asked, what was decided. Facts only."
    )


def setup(registry: Plugin, config: Config) -> None:
    """Register the post-hook, the worker and the context provider."""
    services = registry.services
    queue: asyncio.Queue[tuple[ConversationKey, str, tuple[Turn, ...]]] = asyncio.Queue(
        config.queue)
    pending: set[ConversationKey] = set()

    async def after(exchange: Exchange) -> None:
        message = exchange.message
        if message.key in pending:
            return
        await registry.storage.user(message.channel, message.user_id).set(
            ref(message.key), True)  # so /forget finds this conversation's summary
        # The window as this exchange left it (history + the new pair, trimmed): its
        # oldest turns leave memory with the next exchange.
        window = services.window
        now = (*exchange.history, *_pair(exchange))[-window:]
        if len(now) < window or message.key in pending:
            return
        pending.add(message.key)
        upto = float(await registry.conversation_state(message.key).get("upto", 0.0))
        fresh = tuple(t for t in now[:-2] if t.at > upto)
        if not fresh or now[0].at <= upto:
            pending.discard(message.key)
            return  # what is about to leave the window is in the summary already
        try:
            queue.put_nowait((message.key, message.user_id, fresh))
        except asyncio.QueueFull:
            pending.discard(message.key)
            log.info("summary: queue full, %s waits for its next reply", message.key)

    async def work() -> None:
        while True:
            key, user_id, turns = await queue.get()
            try:
                await registry.registry.contained(NAME, "summarise",
                                                  summarise(key, user_id, turns))
            finally:
                pending.discard(key)

    async def summarise(key: ConversationKey, user_id: str, turns: tuple[Turn, ...]) -> None:
        if services.generator is None or not turns:
            return
        state = registry.conversation_state(key)
        previous = await state.get("summary", "")
        transcript = "\n".join(f"{t.role}: {t.text}" for t in turns)
        if previous:
            transcript = f"Earlier summary: {previous}\n\n{transcript}"
        request = GenerationRequest(
            messages=(ChatMessage("system", config.instructions),
                      ChatMessage("user", transcript)),
            sampling=SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0),
            tenant=f"{key.bot}:summary", user=f"{key.channel}:{user_id}")
        pieces = [delta.text async for delta in services.generator.stream(request)]
        summary = "".join(pieces).strip()
        if summary:
            await state.update({"summary": summary, "upto": turns[-1].at})

    async def context(message: IncomingMessage) -> AddContext | None:
        summary = await registry.conversation_state(message.key).get("summary")
        return AddContext(f"Summary of the earlier conversation: {summary}") if summary \
            else None

    async def forget(channel: str, user_id: str) -> int:
        refs = await registry.storage.user(channel, user_id).items()
        count = 0
        for raw in refs:
            conv_channel, _, conversation = raw.partition(":")
            key = ConversationKey(services.bot, unquote(conv_channel), unquote(conversation))
            count += int(await registry.conversation_state(key).clear())
        return count

    async def start() -> None:
        registry.spawn(work(), "summary worker")

    registry.add_post_hook(after)
    registry.add_context_provider(context)
    registry.on_forget(forget)
    registry.on_start(start)


def _pair(exchange: Exchange) -> tuple[Turn, Turn]:
    """The two turns the engine stored for ``exchange`` (their times, near enough)."""
    message = exchange.message
    return (Turn("user", message.text, message.user_id, message.message_id,
                 message.received_at),
            Turn("assistant", exchange.reply, at=time.time()))


def ref(key: ConversationKey) -> str:
    """A conversation as a field name: ``channel:conversation``, each part encoded."""
    return f"{key_part(key.channel)}:{key_part(key.conversation_id)}"

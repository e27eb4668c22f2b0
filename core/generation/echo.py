"""A generator that repeats the user's last message, for tests and pipeline benchmarks."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from core.config import BotSettings, Section
from core.generation.base import GenerationRequest, TokenDelta, backend_settings
from core.lifecycle import ServiceBase

_WORD = re.compile(r"\s*\S+")


class EchoGenerator(ServiceBase):
    """Streams the newest user message back word by word; ``max_new_tokens`` caps words.

    Needs no model and no start-up, so bot authors can test their whole pipeline offline.
    """

    def __init__(self, settings: BotSettings | None = None) -> None:
        self.settings = settings

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """The last user message, one word (with its leading space) per delta."""
        messages = request.messages
        if messages and messages[-1].role == "user":
            text = messages[-1].content
        else:
            text = next((m.content for m in reversed(messages) if m.role == "user"), "")
        words = _WORD.findall(text.strip())
        limit = request.sampling.max_new_tokens
        shown = words[:limit]
        if not shown:
            yield TokenDelta("", finish_reason="stop")
            return
        for word in shown[:-1]:
            await asyncio.sleep(0)  # let other conversations run, as a real model would
            yield TokenDelta(word)
        await asyncio.sleep(0)
        yield TokenDelta(shown[-1], "length" if len(words) > limit else "stop")


def create(settings: BotSettings) -> EchoGenerator:
    """Entry point ``parley.generators: echo``; the echo backend has no keys of its own."""
    backend_settings(settings.generation, Section, source=settings.source)
    return EchoGenerator(settings)

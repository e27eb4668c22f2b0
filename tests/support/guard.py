"""The output guard driven over pieces as a model would stream them (for tests)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

from core.moderation.base import ReplyWithheld
from core.moderation.guard import GuardConfig, guard_stream


async def run_guard(pieces: list[str], config: GuardConfig) -> tuple[list[str], bool]:
    """The pieces the guard shows, and whether it withheld the reply."""

    async def source() -> AsyncIterator[str]:
        for piece in pieces:
            yield piece

    async def report(*args: Any) -> None:
        pass

    shown: list[str] = []
    try:
        async for piece in guard_stream(source(), config, report):
            shown.append(piece)
    except ReplyWithheld:
        return shown, True
    return shown, False


def chunks(text: str, cuts: list[int]) -> list[str]:
    """``text`` cut at ``cuts`` (taken modulo its length): random token boundaries."""
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points) if b > a]

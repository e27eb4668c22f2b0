"""The Discord adapter on the fake Discord: replies per second, edit pacing, a 429 storm.

The real discord.py client against ``bots.testing.discord.FakeDiscord`` on loopback,
echo generator, embedded memory:

    python bench/discord_channel.py
    python bench/discord_channel.py --channels 50 --per-channel 20 --edit-interval 1.0

Prints three lines: replies/s with streaming off (DMs answered concurrently, one lane
per conversation), the gaps between the edits of one streamed reply, and a storm of 429s
(more in a row than discord.py retries by itself) with the count of replies lost,
duplicated or out of order.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from bots.discord.adapter import DiscordAdapter
from bots.testing.discord import FakeDiscord
from core.app import build_engine
from core.config import parse_settings
from core.generation.base import GenerationRequest, TokenDelta
from core.lifecycle import ServiceBase


class _Trickle(ServiceBase):
    """Streams the user's words back, one every ``delay`` seconds (a model's pace)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        for i, word in enumerate(request.messages[-1].content.split(" ")):
            await asyncio.sleep(self.delay)
            yield TokenDelta(word if i == 0 else " " + word)
        yield TokenDelta("", finish_reason="stop")


@asynccontextmanager
async def _bot(discord: FakeDiscord, trickle: float | None = None,
               **table: Any) -> AsyncIterator[None]:
    settings = parse_settings({"bot": {"name": "bench"}, "generation": {
        "backend": "echo", "max_new_tokens": 1000}, "memory": {"backend": "embedded"}})
    engine = build_engine(settings)
    if trickle is not None:
        engine.generator = _Trickle(trickle)
    adapter = DiscordAdapter(settings, {
        "token": discord.token, "api_base_url": discord.api_base_url,
        "gateway_url": discord.gateway_url, "guild_ready_timeout": 0.05, **table})
    async with engine:
        await adapter.start(engine)
        try:
            yield
        finally:
            await adapter.stop()


async def throughput(channels: int, per_channel: int) -> None:
    async with FakeDiscord() as discord:
        alice = discord.add_user("alice")
        dms = [discord.open_dm(discord.add_user(f"user{i}")) for i in range(channels)]
        async with _bot(discord, streaming=False):
            started = time.perf_counter()
            for n in range(per_channel):
                for dm in dms:
                    discord.post(dm, alice, f"message {n}")
            total = channels * per_channel
            await discord.wait_until(
                lambda: sum(len(discord.sent(dm)) for dm in dms) == total, within=600)
            seconds = time.perf_counter() - started
        wrong = sum([m.content for m in discord.sent(dm)] != [f"message {n}" for n in
                    range(per_channel)] for dm in dms)
        print(f"throughput: {total} replies in {seconds:.2f} s = {total / seconds:.0f} "
              f"replies/s ({channels} DMs x {per_channel}, streaming off); "
              f"DMs with a wrong or misordered reply: {wrong}")


async def pacing(edit_interval: float, words: int) -> None:
    async with FakeDiscord() as discord:
        dm = discord.open_dm(alice := discord.add_user("alice"))
        text = " ".join(f"word{i}" for i in range(words))
        async with _bot(discord, trickle=0.05, edit_interval=edit_interval):
            started = time.perf_counter()
            discord.post(dm, alice, text)
            await discord.wait_until(lambda: [m.content for m in discord.sent(dm)] == [text],
                                     within=600)
            seconds = time.perf_counter() - started
        [message] = discord.sent(dm)
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(message.versions)]
        print(f"pacing: a {seconds:.2f} s reply shown in 1 post + {len(message.edits)} edits; "
              f"gaps min {min(gaps):.3f} s, mean {sum(gaps) / len(gaps):.3f} s "
              f"(edit_interval {edit_interval})")


async def storm(replies: int, rate_limited: int) -> None:
    async with FakeDiscord() as discord:
        guild = discord.add_guild("club")
        channel = discord.add_channel(guild, "general")
        alice = discord.add_user("alice")
        async with _bot(discord, streaming=False, answer_in="always"):
            discord.rate_limit(rate_limited, retry_after=0.02)
            started = time.perf_counter()
            for n in range(replies):
                discord.post(channel, alice, f"storm {n}")
            await discord.wait_until(lambda: len(discord.sent(channel)) >= replies, within=600)
            seconds = time.perf_counter() - started
            await asyncio.sleep(0.5)  # room for a duplicate to arrive
        got = [m.content for m in discord.sent(channel)]
        expected = [f"storm {n}" for n in range(replies)]
        served = sum(r.status == 429 for r in discord.requests)
        print(f"storm: {served} 429s served, {replies} replies in {seconds:.2f} s; lost "
              f"{len(set(expected) - set(got))}, duplicated {len(got) - len(set(got))}, "
              f"in order: {got == expected}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--per-channel", type=int, default=10)
    parser.add_argument("--edit-interval", type=float, default=1.0)
    parser.add_argument("--words", type=int, default=100)
    args = parser.parse_args()
    await throughput(args.channels, args.per_channel)
    await pacing(args.edit_interval, args.words)
    await storm(20, 50)


if __name__ == "__main__":
    asyncio.run(main())

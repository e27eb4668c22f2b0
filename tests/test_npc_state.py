"""A player's state with an NPC under concurrent lines: no change is lost.

Each line moves the relationship with one atomic, clamped increment and adds its facts
with one atomic extend (Lua scripts on Redis; in the embedded store nothing awaits
between the read and the write), so lines that finish at the same moment all count.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from core.testing import ChatHarness, ScriptedGenerator
from plugins.npc.state import Players, PlayerState
from tests.test_npc_api import BOT_FILE, village


@asynccontextmanager
async def players(memory_url: str | None, prefix: str | None) -> AsyncIterator[Players]:
    harness = ChatHarness.from_file(BOT_FILE, generator=ScriptedGenerator(["Hm."]),
                                    memory_url=memory_url, key_prefix=prefix)
    async with harness:
        yield Players(harness.engine.plugins.plugin("npc"), "npc", max_facts=20)


@pytest.mark.parametrize("backend", ["redis", "embedded"])
async def test_concurrent_moves_all_count_and_clamp(backend: str, redis_url: str,
                                                    memory_prefix: str) -> None:
    url, prefix = (redis_url, memory_prefix) if backend == "redis" else (None, None)
    async with players(url, prefix) as kept:
        # Every move reads the state before any writes it: a read-modify-write keeps one.
        await asyncio.gather(*(kept.moved("mira", "p1", 1, ()) for _ in range(40)))
        assert (await kept.get("mira", "p1")).relationship == 40
        await asyncio.gather(*(kept.moved("mira", "p1", 3, ()) for _ in range(40)))
        assert (await kept.get("mira", "p1")).relationship == 100  # clamped at the top
        await asyncio.gather(*(kept.moved("mira", "p1", -7, ()) for _ in range(40)))
        assert (await kept.get("mira", "p1")).relationship == -100  # and at the bottom
        results = await asyncio.gather(*(kept.moved("mira", "p2", 2, ()) for _ in range(10)))
        assert sorted(r.relationship for r in results) == list(range(2, 21, 2))
        assert (await kept.get("oskar", "p1")).relationship == 0


@pytest.mark.parametrize("backend", ["redis", "embedded"])
async def test_concurrent_facts_are_all_kept_once_and_capped(backend: str, redis_url: str,
                                                             memory_prefix: str) -> None:
    url, prefix = (redis_url, memory_prefix) if backend == "redis" else (None, None)
    async with players(url, prefix) as kept:
        await asyncio.gather(*(kept.moved("mira", "p1", 1, (f"fact {n}", "likes swords"))
                               for n in range(12)))
        state = await kept.get("mira", "p1")
        assert state.relationship == 12
        assert sorted(state.facts) == sorted({"likes swords", *(f"fact {n}" for n in range(12))})
        await asyncio.gather(*(kept.moved("mira", "p1", 0, (f"later {n}",)) for n in range(30)))
        state = await kept.get("mira", "p1")
        assert len(state.facts) == 20 and len(set(state.facts)) == 20  # max_facts, newest
        assert all(f.startswith("later") for f in state.facts)
        await kept.put("mira", "p1", PlayerState(5, ("carries a letter",)))
        assert await kept.get("mira", "p1") == PlayerState(5, ("carries a letter",))
        await kept.reset("mira", "p1")
        assert await kept.get("mira", "p1") == PlayerState()


async def test_a_state_kept_before_the_relationship_had_its_own_field_still_counts(
    redis_url: str, memory_prefix: str,
) -> None:
    async with players(redis_url, memory_prefix) as kept:
        bucket = kept._bucket("p1")
        await bucket.set("mira", {"relationship": 30, "facts": ["likes swords"]})
        assert (await kept.get("mira", "p1")).relationship == 30
        await asyncio.gather(*(kept.moved("mira", "p1", 1, ()) for _ in range(5)))
        state = await kept.get("mira", "p1")
        assert (state.relationship, state.facts) == (35, ("likes swords",))
        await kept.moved("mira", "p1", 0, ("owes three silver",))
        state = await kept.get("mira", "p1")
        assert (state.relationship, state.facts) == (35, ("likes swords", "owes three silver"))


async def test_concurrent_lines_from_two_front_ends_all_move_the_relationship(
    redis_url: str, memory_prefix: str,
) -> None:
    """Two web servers on one Redis, one player talking to one NPC through both at once."""
    line = "Thank you. [relationship: +1] [emotion: happy]"
    shared = {"memory_url": redis_url, "key_prefix": memory_prefix,
              "moderation": {"backend": "passthrough"}}  # no flood limit on the burst
    async with village(ScriptedGenerator([line]), **shared) as one, \
            village(ScriptedGenerator([line]), **shared) as two:
        answers = await asyncio.gather(*(
            game.talk("mira", "p1", f"A gift, number {n}.")
            for n, game in enumerate([one, two] * 7)))  # within max_queued
        assert sorted(a["relationship"] for a in answers) == list(range(1, 15))
        assert (await one.call("GET", "/mira/players/p1"))["relationship"] == 14

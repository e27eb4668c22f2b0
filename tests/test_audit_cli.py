"""``parley audit``: readable times and filters, over a real redis-server's audit stream."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from core.config import parse_settings
from core.moderation.audit_cli import AuditFilter, parse_when, print_audit
from core.moderation.state_redis import RedisState

REPO = Path(__file__).resolve().parents[1]
NOW = time.time()
# (seconds ago, channel, user, policy, action)
ENTRIES = [
    (7200, "web", "ann", "terms:idiot", "block"),
    (3000, "web", "bob", "pii:email", "mask"),
    (1800, "console", "ann", "pii:phone,injection", "block"),
    (600, "discord", "cid", "classifier", "block"),
    (60, "web", "ann", "flood", "block"),
]


def settings(url: str, prefix: str) -> object:
    return parse_settings({
        "bot": {"name": "abot"}, "generation": {"backend": "echo"},
        "memory": {"backend": "redis", "url": url, "key_prefix": prefix},
        "moderation": {"backend": "filters"},
    })


async def fill(url: str, prefix: str, now: float = NOW) -> None:
    async with RedisState(url, prefix=prefix, bot="abot") as state:
        for ago, channel, user, policy, action in ENTRIES:
            await state.record({"ts": f"{now - ago:.3f}", "channel": channel, "user": user,
                                "policy": policy, "action": action, "stage": "input",
                                "scores": "{}", "hash": "h" * 32, "degraded": ""})


async def shown(url: str, prefix: str, **where: object) -> list[dict[str, str]]:
    out = io.StringIO()
    bot = settings(url, prefix)
    status = await print_audit(bot, as_json=True, out=out,  # type: ignore[arg-type]
                               where=AuditFilter(**where))  # type: ignore[arg-type]
    assert status == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_filters_by_user_channel_category_and_time(redis_url: str,
                                                         memory_prefix: str) -> None:
    await fill(redis_url, memory_prefix)
    everything = await shown(redis_url, memory_prefix)
    assert [r["user"] for r in everything] == ["ann", "cid", "ann", "bob", "ann"]  # newest first
    assert [r["channel"] for r in await shown(redis_url, memory_prefix, user="ann")] == [
        "web", "console", "web"]
    assert [r["user"] for r in await shown(redis_url, memory_prefix, channel="web")] == [
        "ann", "bob", "ann"]
    assert [r["policy"] for r in await shown(redis_url, memory_prefix, category="pii")] == [
        "pii:phone,injection", "pii:email"]
    assert [r["policy"] for r in await shown(redis_url, memory_prefix,
                                             category="pii:email")] == ["pii:email"]
    assert [r["policy"] for r in await shown(redis_url, memory_prefix,
                                             category="injection")] == ["pii:phone,injection"]
    recent = await shown(redis_url, memory_prefix, since=parse_when("40m", NOW))
    assert [r["channel"] for r in recent] == ["web", "discord", "console"]
    older = await shown(redis_url, memory_prefix, until=parse_when("1h", NOW), user="ann")
    assert [r["policy"] for r in older] == ["terms:idiot"]
    assert (await shown(redis_url, memory_prefix, user="nobody")) == []
    # Each JSON entry carries its time in ISO 8601 beside the stream id.
    first = everything[-1]
    assert datetime.fromisoformat(first["time"]).timestamp() == pytest.approx(NOW - 7200, abs=1)


def test_parse_when() -> None:
    assert parse_when("90s", 1000.0) == 910.0
    assert parse_when("2h", 10_000.0) == 10_000.0 - 7200
    assert parse_when("1.5d", 200_000.0) == 200_000.0 - 1.5 * 86400
    assert parse_when("2026-11-29T20:00:00+00:00") == 1795982400.0
    assert parse_when("2026-11-29") == datetime(2026, 11, 29).timestamp()
    with pytest.raises(ValueError, match="neither a time ago"):
        parse_when("yesterday")


def test_the_command_prints_local_times_and_refuses_a_bad_time(
    redis_url: str, memory_prefix: str, tmp_path: Path
) -> None:
    now = time.time()  # the entries' times are relative to when the command runs
    asyncio.run(fill(redis_url, memory_prefix, now))
    path = tmp_path / "abot.toml"
    path.write_text(f'[bot]\nname = "abot"\n[generation]\nbackend = "echo"\n'
                    f'[memory]\nbackend = "redis"\nurl = "{redis_url}"\n'
                    f'key_prefix = "{memory_prefix}"\n[moderation]\nbackend = "filters"\n',
                    encoding="utf-8")
    command = [sys.executable, "-m", "core.cli", "audit", str(path)]
    result = subprocess.run([*command, "--channel", "web", "--since", "1h"],
                            capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    expected = datetime.fromtimestamp(now - 60).strftime("%Y-%m-%d %H:%M")
    assert lines[0].startswith(expected), lines[0]  # a readable time, not a stream id
    assert " web/ann flood" in lines[0] and " web/bob pii:email" in lines[1]
    bad = subprocess.run([*command, "--since", "last week"], capture_output=True, text=True,
                         cwd=REPO, timeout=120, check=False)
    assert bad.returncode == 2 and "neither a time ago" in bad.stderr

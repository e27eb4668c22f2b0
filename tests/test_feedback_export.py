"""``parley feedback``: every rating the widget's users gave, exported by the operator as
JSON Lines or CSV (a real web adapter on the session's redis-server; the command as a
real process)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from bots.web.feedback import Feedback
from bots.web.routes import HUB
from core.config import load_settings
from tests.support.widget import final_of, frames_until, open_widget, serving_settings

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]


def bot_file(tmp_path: Path, memory: str) -> Path:
    config = tmp_path / "bot.toml"
    config.write_text(
        '[bot]\nname = "rated"\n[generation]\nbackend = "echo"\n' + memory +
        f'[adapters.web]\nport = 0\nsecret = "{"k" * 32}"\n', encoding="utf-8")
    return config


async def parley(*args: str) -> tuple[int, str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "core.cli", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def rate(http: aiohttp.ClientSession, url: str,
               ratings: list[tuple[str, str, str]]) -> str:
    """A widget session that says each text and rates its reply; its conversation id."""
    session, ws, _ = await open_widget(http, url)
    for i, (text, rating, comment) in enumerate(ratings):
        await ws.send_json({"type": "message", "id": f"m{i}", "text": text})
        await frames_until(ws, final_of(f"m{i}"))
        await ws.send_json({"type": "feedback", "message_id": f"m{i}", "rating": rating,
                            "comment": comment})
        await frames_until(ws, lambda f: f["type"] == "feedback_saved")
    await ws.close()
    return str(session["conversation_id"])


async def test_the_operator_exports_every_rating_as_jsonl_or_csv(
    tmp_path: Path, redis_url: str, memory_prefix: str
) -> None:
    config = bot_file(tmp_path, f'[memory]\nbackend = "redis"\nurl = "{redis_url}"\n'
                                f'key_prefix = "{memory_prefix}"\n')
    async with serving_settings(load_settings(config)) as (_, adapter, url):
        async with aiohttp.ClientSession() as http:
            first = await rate(http, url, [("how do I reset it?", "up", "clear, thanks"),
                                           ("and the filter?", "down", 'wrong, "see p. 4"')])
            second = await rate(http, url, [("hello, commas, here", "up", "")])
        # A rating given long ago, as it would be stored then.
        old = Feedback("m0", "down", "old news", "ancient question", "ancient answer",
                       "u-old", time.time() - 10 * 86400)
        await adapter._runner.app[HUB].feedback.put("web:c-old", old)  # type: ignore[union-attr]

    code, out, err = await parley("feedback", str(config))
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["conversation_id"], r["prompt"], r["rating"], r["comment"]) for r in rows] == [
        ("c-old", "ancient question", "down", "old news"),
        (first, "how do I reset it?", "up", "clear, thanks"),
        (first, "and the filter?", "down", 'wrong, "see p. 4"'),
        (second, "hello, commas, here", "up", ""),
    ]
    assert all(r["bot"] == "rated" and r["channel"] == "web" and r["at"].endswith("Z")
               for r in rows)
    assert rows[1]["reply"] == "how do I reset it?"  # the echo generator's reply
    assert rows[1]["user_id"].startswith("anon-") and rows[1]["message_id"] == "m0"
    assert "4 ratings" in err

    target = tmp_path / "out.csv"
    code, out, err = await parley("feedback", str(config), "--since", "7d", "--format", "csv",
                                  "--output", str(target))
    assert code == 0 and out == "", err
    table = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"))))
    assert [(r["prompt"], r["comment"]) for r in table] == [
        ("how do I reset it?", "clear, thanks"), ("and the filter?", 'wrong, "see p. 4"'),
        ("hello, commas, here", "")]
    assert list(table[0]) == ["bot", "channel", "conversation_id", "message_id", "user_id",
                              "rating", "comment", "prompt", "reply", "at"]

    code, _, err = await parley("feedback", str(config), "--since", "yesterday-ish")
    assert code == 2 and "neither a time ago" in err


async def test_ratings_kept_in_the_bots_own_process_cannot_be_exported(
    tmp_path: Path
) -> None:
    code, _, err = await parley("feedback", str(bot_file(tmp_path, "")))
    assert code == 2 and 'memory.backend = "redis"' in err

"""Plugins' own messages on the web channel, end to end: config/support.toml's handoff.

Two real ``parley run`` front ends of the shipped support bot (echo generator, BM25 FAQ,
memory on the session's redis-server): a widget user on one asks for a human over the
WebSocket API; a colleague on the other reads the agents' conversation over the HTTP API
(``GET /api/v1/chat/messages``) and answers with ``/reply``; the answer reaches the
widget at once, and again after a page load, in its place in the conversation.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.widget import final_of, frames_until, open_widget, serving_settings
from tests.test_scale_out import REPO, free_port, wait_until_serving

pytestmark = pytest.mark.timeout(180)

SECRET = "outbox-test-secret-0123456789"


def support_config(tmp_path: Path, name: str, *, redis_url: str, prefix: str,
                   port: int) -> Path:
    """config/support.toml as shipped, with what a test machine needs changed (each
    change checked, so the test notices when the example changes under it)."""
    text = (REPO / "config" / "support.toml").read_text(encoding="utf-8")
    faq = (REPO / "config" / "support" / "faq.json").as_posix()
    for old, new in (
        ('backend = "local"\nmodel = "smollm2-135m"', 'backend = "echo"'),
        ('[memory]\nbackend = "embedded"',
         f'[memory]\nbackend = "redis"\nurl = "{redis_url}"\nkey_prefix = "{prefix}"'),
        ('file = "support/faq.json"', f'file = "{faq}"'),
        ('retriever = "embeddings"', 'retriever = "bm25"'),
        ("port = 8081", f'port = {port}\nsecret = "{SECRET}"'),
    ):
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


@contextmanager
def support_front_ends(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[list[str]]:
    """Two ``parley run config/support.toml`` processes; yields their base URLs."""
    procs: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for i in range(2):
            port = free_port()
            config = support_config(tmp_path, f"front{i}", redis_url=redis_url,
                                    prefix=prefix, port=port)
            log = open(tmp_path / f"front{i}.log", "wb")
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            procs.append((subprocess.Popen(
                [sys.executable, "-m", "core.cli", "run", str(config)],
                cwd=REPO, env=env, stdout=log, stderr=log), f"http://127.0.0.1:{port}"))
            log.close()
        for proc, url in procs:
            wait_until_serving(proc, url, tmp_path)
        yield [url for _, url in procs]
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Agent:
    """A colleague on the agents' conversation, through the HTTP chat API."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.after = 0

    async def say(self, text: str) -> dict[str, Any]:
        body = {"conversation_id": "agents", "user_id": "agent-1", "text": text}
        async with self.http.post(self.url + "/api/v1/chat", json=body) as response:
            assert response.status == 200, await response.text()
            reply: dict[str, Any] = await response.json()
            return reply

    async def read(self, count: int = 1) -> list[str]:
        """The next ``count`` messages the bot sent into the agents' conversation."""
        got: list[str] = []
        async with asyncio.timeout(20):
            while len(got) < count:
                async with self.http.get(self.url + "/api/v1/chat/messages", params={
                        "conversation_id": "agents", "after": str(self.after)}) as response:
                    assert response.status == 200, await response.text()
                    body = await response.json()
                for message in body["messages"]:
                    got.append(message["text"])
                    self.after = message["seq"]
                if len(got) < count:
                    await asyncio.sleep(0.1)
        return got


async def test_a_colleague_answers_a_widget_user_through_the_handoff(
    tmp_path: Path, redis_url: str, memory_prefix: str
) -> None:
    with support_front_ends(tmp_path, redis_url, memory_prefix) as (user_url, agent_url):
        async with aiohttp.ClientSession() as http:
            session, ws, _ = await open_widget(http, user_url)
            agent = Agent(http, agent_url)

            await ws.send_json({"type": "message", "id": "m1", "text": "/human"})
            (handed,) = [f for f in await frames_until(ws, final_of("m1"))
                         if f.get("kind") in ("final", "notice")]
            assert "colleague" in handed["text"]
            (call,) = await agent.read()
            match = re.search(r"/reply (\S+) TEXT", call)
            assert match is not None, call
            ref = match.group(1)
            assert ref == f"web:{session['conversation_id']}"

            # While a colleague has it, the user's words go to them, and the bot says nothing.
            await ws.send_json({"type": "message", "id": "m2",
                                "text": "my thermostat is blinking red"})
            quiet = await frames_until(ws, final_of("m2"))
            assert [(f["kind"], f["text"]) for f in quiet if f.get("type") == "event"] == [
                ("user", "my thermostat is blinking red"), ("notice", "")]
            assert (await agent.read())[0].endswith(": my thermostat is blinking red")

            answer = "Hold the dial for 10 seconds."
            assert (await agent.say(f"/reply {ref} {answer}"))["text"] == f"Sent to {ref}."
            (got,) = [f for f in await frames_until(
                ws, lambda f: f.get("kind") == "message") if f.get("kind") == "message"]
            assert got["text"] == answer and got["message_id"].startswith("out-")
            await ws.close()

            # A page load (on the colleague's front end, even) shows the whole exchange.
            _, ws, history = await open_widget(http, agent_url, session["token"])
            assert [(t["role"], t.get("kind"), t["text"]) for t in history["turns"]] == [
                ("user", None, "/human"),
                ("assistant", "notice", handed["text"]),  # a command's: not in memory
                ("user", None, "my thermostat is blinking red"),
                ("assistant", "message", answer),
            ]
            # The colleague hands back: the widget is told, live.
            assert "back with the bot" in (await agent.say(f"/release {ref}"))["text"]
            (back,) = [f for f in await frames_until(
                ws, lambda f: f.get("kind") == "message") if f.get("kind") == "message"]
            assert back["text"] == "I'm back. How can I help?"
            await ws.close()


async def test_messages_poll_needs_a_conversation_and_a_number(
    tmp_path: Path, redis_url: str, memory_prefix: str
) -> None:
    from core.config import load_settings

    settings = load_settings(support_config(tmp_path, "bot", redis_url=redis_url,
                                            prefix=memory_prefix, port=free_port()))
    async with serving_settings(settings) as (_, _, url), aiohttp.ClientSession() as http:
        base = url + "/api/v1/chat/messages"
        for query in ({}, {"conversation_id": "agents", "after": "-1"},
                      {"conversation_id": "agents", "after": "x"}):
            async with http.get(base, params=query) as response:
                assert response.status == 400, query
        async with http.get(base, params={"conversation_id": "nobody"}) as response:
            assert await response.json() == {"messages": [], "last": 0, "gap": False}

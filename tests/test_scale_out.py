"""Two ``parley run`` front ends on one Redis: one conversation stays in order.

Real processes (``python -m core.cli run``), each with the web adapter on loopback and
memory on the session's redis-server. Their generator is the ``openai`` backend pointed
at a fake OpenAI-compatible server in this process, which answers each request with how
many user turns the prompt carried: so every stored reply says what history it saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
_SAW = re.compile(r"^(\S+) saw (\d+)$")


class FakeModel:
    """An OpenAI-compatible chat server: replies "<last message> saw <user turns before>".

    A reply waits ``delay`` seconds first (so replies overlap); a message containing
    "hold" waits until :attr:`release` is set.
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.release = asyncio.Event()
        self.holding = asyncio.Event()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        users = [m["content"] for m in body["messages"] if m["role"] == "user"]
        if "hold" in users[-1]:
            self.holding.set()
            await self.release.wait()
        await asyncio.sleep(self.delay)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece, reason in ((f"{users[-1]} ", None), (f"saw {len(users) - 1}", "stop")):
            chunk = {"choices": [{"index": 0, "delta": {"content": piece},
                                  "finish_reason": reason}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


@asynccontextmanager
async def fake_model(delay: float) -> AsyncIterator[tuple[FakeModel, str]]:
    model = FakeModel(delay)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", model.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield model, f"http://127.0.0.1:{port}/v1"
    finally:
        model.release.set()
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def front_ends(tmp_path: Path, count: int, *, model_url: str, redis_url: str, prefix: str,
               lease: float | None = None) -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    """``count`` ``parley run`` processes serving one bot; yields (process, base URL)."""
    procs: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for i in range(count):
            port = free_port()
            config = tmp_path / f"front{i}.toml"
            config.write_text(
                '[bot]\nname = "scaled"\n'
                f'[generation]\nbackend = "openai"\nurl = "{model_url}"\nmodel = "fake"\n'
                f'[memory]\nbackend = "redis"\nurl = "{redis_url}"\nkey_prefix = "{prefix}"\n'
                "window = 200\n" + (f"lease = {lease}\n" if lease else "") +
                f"[adapters.web]\nport = {port}\n",
                encoding="utf-8",
            )
            log = open(tmp_path / f"front{i}.log", "wb")  # closed once the child has it
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            proc = subprocess.Popen([sys.executable, "-m", "core.cli", "run", str(config)],
                                    cwd=REPO, env=env, stdout=log, stderr=log)
            log.close()
            procs.append((proc, f"http://127.0.0.1:{port}"))
        for proc, url in procs:
            wait_until_serving(proc, url, tmp_path)
        yield procs
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait()


def wait_until_serving(proc: subprocess.Popen[bytes], url: str, tmp_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("front*.log"))
            pytest.fail(f"a front end exited: {logs[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), 0.2):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail("a front end did not start listening")


async def send(http: aiohttp.ClientSession, url: str, text: str, **fields: str) -> Any:
    body = {"conversation_id": "room", "user_id": "u1", "text": text, **fields}
    async with http.post(f"{url}/api/v1/chat", json=body) as response:
        return response.status, await response.json()


async def stored_turns(redis_url: str, prefix: str) -> list[dict[str, Any]]:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        raw = await client.lrange(f"{prefix}:scaled:conv:web:room", 0, -1)
    finally:
        await client.aclose()
    return [json.loads(item) for item in raw]


async def test_one_conversation_through_two_front_ends_stays_in_order(
    tmp_path: Path, redis_url: str, memory_prefix: str
) -> None:
    async with fake_model(delay=0.05) as (_, model_url):
        with front_ends(tmp_path, 2, model_url=model_url, redis_url=redis_url,
                        prefix=memory_prefix) as procs:
            async with aiohttp.ClientSession() as http:
                async def one(i: int) -> Any:
                    await asyncio.sleep(i * 0.02)  # arrivals spread, replies overlapping
                    return await send(http, procs[i % 2][1], f"m{i}")

                results = await asyncio.gather(*(one(i) for i in range(24)))
    assert [status for status, _ in results] == [200] * 24, results
    assert all(body["kind"] == "final" for _, body in results)
    turns = await stored_turns(redis_url, memory_prefix)
    users = [t["text"] for t in turns if t["role"] == "user"]
    replies = [t["text"] for t in turns if t["role"] == "assistant"]
    assert sorted(users) == sorted(f"m{i}" for i in range(24))
    assert [t["role"] for t in turns] == ["user", "assistant"] * 24
    # Every reply saw every turn stored before it: nothing answered from a stale history.
    for position, (user, reply) in enumerate(zip(users, replies, strict=True)):
        assert _SAW.match(reply) is not None, reply
        assert reply == f"{user} saw {position}", (position, users, replies)
    # (Arrival order within one process is the in-process lane's, tested in
    # test_engine; here the HTTP requests themselves may overtake each other.)


async def test_a_crashed_holder_blocks_its_conversation_for_one_lease_at_most(
    tmp_path: Path, redis_url: str, memory_prefix: str
) -> None:
    lease = 2.0
    async with fake_model(delay=0.0) as (model, model_url):
        with front_ends(tmp_path, 2, model_url=model_url, redis_url=redis_url,
                        prefix=memory_prefix, lease=lease) as procs:
            async with aiohttp.ClientSession() as http:
                held = asyncio.create_task(send(http, procs[0][1], "hold this"))
                await model.holding.wait()  # front end 0 holds the conversation's lease
                procs[0][0].kill()
                started = time.monotonic()
                status, body = await send(http, procs[1][1], "after the crash")
                waited = time.monotonic() - started
                held.cancel()
    assert (status, body["text"]) == (200, "after the crash saw 0")
    assert waited < lease + 2.0

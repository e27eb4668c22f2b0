"""API keys: the worker's OpenAI-compatible API and the web channel's HTTP chat API
take who is calling from a bearer key, never from what a request claims."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bots.web.adapter import WebAdapter
from core.api_keys import ApiKeys
from core.app import build_engine
from core.config import ApiKeySection, parse_settings
from core.errors import ConfigError
from core.generation.base import GenerationRequest, TokenDelta
from core.generation.echo import EchoGenerator
from core.generation.openai.server import openai_app
from core.types import ConversationKey
from tests.test_openai import serve_app

pytestmark = pytest.mark.timeout(60)

MODEL = "keyed-model"
KEY_A, KEY_B = "a-secret-key-0123456789", "b-secret-key-9876543210"


class Recorder(EchoGenerator):
    """Echo that records each request and can be held open."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[GenerationRequest] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.arrived = asyncio.Event()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        self.seen.append(request)
        self.arrived.set()
        await self.gate.wait()
        async for delta in super().stream(request):
            yield delta


def body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], **fields}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_the_worker_api_takes_its_tenant_from_the_key() -> None:
    keys = ApiKeys([ApiKeySection(key=KEY_A, tenant="game-a", max_in_flight=2),
                    ApiKeySection(key=KEY_B, tenant="game-b")])
    generator = Recorder()
    async with serve_app(openai_app(generator, MODEL, keys=keys)) as url, \
            aiohttp.ClientSession() as http:
        endpoint = f"{url}/v1/chat/completions"
        async with http.post(endpoint, json=body()) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "invalid_api_key"
        async with http.post(endpoint, json=body(), headers=bearer("not-a-key-at-all")) as r:
            assert r.status == 401
        claims = {**bearer(KEY_A), "X-Parley-Tenant": "game-b"}  # a claim, not trusted
        async with http.post(endpoint, json=body(user="p1"), headers=claims) as r:
            assert r.status == 200
        async with http.post(endpoint, json=body(), headers=bearer(KEY_B)) as r:
            assert r.status == 200
        assert [(s.tenant, s.user) for s in generator.seen] == [
            ("game-a", "game-a:p1"), ("game-b", "game-b:")]
        # Per-key limit: two running for game-a, the third refused at once.
        generator.gate.clear()
        running = [asyncio.create_task(http.post(endpoint, json=body(), headers=bearer(KEY_A)))
                   for _ in range(2)]
        while len(generator.seen) < 4:
            generator.arrived.clear()
            await generator.arrived.wait()
        async with http.post(endpoint, json=body(), headers=bearer(KEY_A)) as r:
            assert r.status == 429
            assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
        generator.gate.set()
        for task in running:
            response = await task
            assert response.status == 200
            response.release()


def test_the_worker_api_beyond_loopback_needs_keys() -> None:
    worker = {"http_host": "0.0.0.0", "http_port": 8000}
    with pytest.raises(ConfigError, match=r"worker: .*http_host '0.0.0.0' is reachable"):
        parse_settings({"bot": {"name": "w"}, "worker": worker})
    keyed = {**worker, "api_keys": [{"key": KEY_A, "tenant": "game-a"}]}
    assert parse_settings({"bot": {"name": "w"}, "worker": keyed}).worker.api_keys
    local = {"http_host": "127.0.0.1", "http_port": 8000}
    assert not parse_settings({"bot": {"name": "w"}, "worker": local}).worker.api_keys


REPO = Path(__file__).resolve().parents[1]


async def test_parley_worker_refuses_to_listen_beyond_loopback_without_keys(
    tmp_path: Path
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[bot]\nname = "w"\n[worker]\nhttp_host = "0.0.0.0"\nhttp_port = 8000\n',
                      encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "core.cli", "worker", str(config),
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert b"api_keys" in err


async def test_the_chat_api_with_keys_keeps_each_tenant_s_users_apart() -> None:
    settings = parse_settings({"bot": {"name": "kbot"}, "generation": {"backend": "echo"}})
    section = {"port": 0, "api_keys": [{"key": KEY_A, "tenant": "shop-a"},
                                       {"key": KEY_B, "tenant": "shop-b"}]}
    async with build_engine(settings) as engine:
        adapter = WebAdapter(settings, section)
        await adapter.start(engine)
        try:
            url = f"http://127.0.0.1:{adapter.port}/api/v1/chat"
            chat = {"conversation_id": "c1", "user_id": "u1", "text": "hello"}
            async with aiohttp.ClientSession() as http:
                async with http.post(url, json=chat) as r:
                    assert r.status == 401
                    assert (await r.json())["code"] == "unauthorized"
                for key, text in ((KEY_A, "from a"), (KEY_B, "from b")):
                    async with http.post(url, json={**chat, "text": text},
                                         headers=bearer(key)) as r:
                        assert r.status == 200
                        reply = await r.json()
                        assert (reply["text"], reply["conversation_id"]) == (text, "c1")
        finally:
            await adapter.stop()
        for tenant, text in (("shop-a", "from a"), ("shop-b", "from b")):
            snap = await engine.memory.load(ConversationKey("kbot", "web", f"{tenant}:c1"),
                                            f"{tenant}:u1")
            assert [(t.text, t.user_id) for t in snap.turns if t.role == "user"] == [
                (text, f"{tenant}:u1")]

"""The OpenAI-compatible API and the ``openai`` backend, each driving the other on loopback.

The server runs over real generators (echo, and the tiny model on the local backend) and
the client is pointed at it; where the far end must misbehave, a small aiohttp server
plays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from core.config import BotSettings, parse_settings
from core.errors import ConfigError, GenerationError, GeneratorBusy
from core.generation.base import (
    ChatMessage,
    GenerationRequest,
    Generator,
    SamplingParams,
    TokenDelta,
    generator_backends,
)
from core.generation.echo import EchoGenerator
from core.generation.local.generator import LocalGenerator
from core.generation.openai.client import OpenAIGenerator
from core.generation.openai.server import MAX_BODY_BYTES, openai_app
from core.streams import closing

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "parley-test"


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1, any free port, as ``parley worker`` would; yields its URL."""
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def api(generator: Generator, **kwargs: Any) -> AsyncIterator[str]:
    """The OpenAI API over ``generator``; yields the base URL clients are given (``.../v1``)."""
    async with serve_app(openai_app(generator, MODEL, **kwargs)) as url:
        yield f"{url}/v1"


def client_settings(url: str, **generation: Any) -> BotSettings:
    return parse_settings({
        "bot": {"name": "otest"},
        "generation": {"backend": "openai", "url": url, "model": MODEL, **generation},
    })


@asynccontextmanager
async def client(url: str, **generation: Any) -> AsyncIterator[OpenAIGenerator]:
    async with OpenAIGenerator(client_settings(url, **generation)) as gen:
        yield gen


def request(text: str, max_new_tokens: int = 100, **sampling: Any) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=max_new_tokens, **{"temperature": 0.0, **sampling})
    return GenerationRequest((ChatMessage("user", text),), params, tenant="otest", user="u1")


async def collect(stream: AsyncIterator[TokenDelta]) -> list[TokenDelta]:
    return [delta async for delta in stream]


def text_of(deltas: list[TokenDelta]) -> str:
    return "".join(d.text for d in deltas)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chat_body(text: str = "hello big wide world", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **fields}


@pytest.fixture
async def echo_api() -> AsyncIterator[str]:
    async with EchoGenerator() as generator, api(generator) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- both real ends: echo ---------------------------------------------------------------


async def test_streaming_round_trip(echo_api: str) -> None:
    async with client(echo_api) as gen:
        deltas = await collect(gen.stream(request("hello big wide world")))
    assert [d.text for d in deltas[:-1]] == ["hello", " big", " wide", " world"]
    assert deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert text_of(deltas) == "hello big wide world"


async def test_max_tokens_reaches_the_generator(echo_api: str) -> None:
    async with client(echo_api) as gen:
        deltas = await collect(gen.stream(request("one two three four", max_new_tokens=2)))
    assert text_of(deltas) == "one two"
    assert deltas[-1].finish_reason == "length"


async def test_sse_bytes_are_what_openai_clients_expect(
    echo_api: str, http: aiohttp.ClientSession
) -> None:
    body = chat_body("hello big world", stream=True)
    async with http.post(f"{echo_api}/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        raw = await response.read()
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = raw.decode("utf-8").split("\n\n")
    assert events[-1] == ""  # every event, the last included, ends with a blank line
    assert events[-2] == "data: [DONE]"
    chunks = []
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        chunks.append(json.loads(event.removeprefix("data: ")))
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["model"] for c in chunks} == {MODEL}
    assert all(isinstance(c["created"], int) for c in chunks)
    choices = [c["choices"] for c in chunks]
    assert all(len(cs) == 1 and cs[0]["index"] == 0 for cs in choices)
    assert choices[0][0]["delta"] == {"role": "assistant", "content": ""}
    assert [cs[0]["delta"] for cs in choices[1:-1]] == [
        {"content": "hello"}, {"content": " big"}, {"content": " world"},
    ]
    assert all(cs[0]["finish_reason"] is None for cs in choices[:-1])
    assert choices[-1][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


async def test_non_streaming_answer(echo_api: str, http: aiohttp.ClientSession) -> None:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "parts"},
                                         {"type": "text", "text": "joined"}]},
        ],
        "max_completion_tokens": 5, "temperature": 0, "top_p": 1, "seed": 7,
        "stop": "never", "user": "player-1", "n": 1, "stream": False,
    }
    async with http.post(f"{echo_api}/chat/completions", json=body) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["object"] == "chat.completion"
    assert answer["id"].startswith("chatcmpl-") and answer["model"] == MODEL
    assert answer["choices"] == [{
        "index": 0, "message": {"role": "assistant", "content": "parts\njoined"},
        "logprobs": None, "finish_reason": "stop",
    }]
    assert "usage" not in answer  # the generator does not count tokens; none are invented


async def test_models_health_and_metrics(http: aiohttp.ClientSession) -> None:
    generator = EchoGenerator()
    async with api(generator, metrics_render=lambda: b"parley_up 1\n") as url:
        base = url.removesuffix("/v1")
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 503  # the owner has not started the generator yet
        async with generator:
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 200
                assert await response.json() == {"status": "ok", "model": MODEL}
            async with http.get(f"{url}/models") as response:
                models = await response.json()
            assert models["object"] == "list"
            assert [m["id"] for m in models["data"]] == [MODEL]
            async with http.get(f"{url}/models/{MODEL}") as response:
                assert (await response.json())["id"] == MODEL
            async with http.get(f"{url}/models/other") as response:
                assert response.status == 404
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 200
                assert await response.read() == b"parley_up 1\n"
        assert not generator.started  # the app never starts or stops the generator itself
    async with EchoGenerator() as generator, api(generator) as url:
        async with http.get(url.removesuffix("/v1") + "/metrics") as response:
            assert response.status == 404


class Recorder(EchoGenerator):
    """Echoes, and keeps each request in ``seen``."""

    def __init__(self, seen: list[GenerationRequest]) -> None:
        super().__init__()
        self.seen = seen

    def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        self.seen.append(request)
        return super().stream(request)


async def test_tenant_and_user_reach_the_generator(http: aiohttp.ClientSession) -> None:
    seen: list[GenerationRequest] = []
    async with Recorder(seen) as generator, api(generator) as url:
        body = chat_body(user="player-1", stop=["a", "b"], seed=3, max_tokens=9,
                         temperature=0.5, top_p=0.5)
        async with http.post(f"{url}/chat/completions", json=body) as response:
            assert response.status == 200
        headers = {"X-Parley-Tenant": "game-7"}
        async with http.post(f"{url}/chat/completions", json=chat_body(), headers=headers):
            pass
        async with client(url) as gen:
            await collect(gen.stream(request("hi", stop=("x",), seed=5, temperature=0.3)))
    first, second, third = seen
    assert (first.tenant, first.user) == ("openai-api", "player-1")
    assert first.sampling == SamplingParams(max_new_tokens=9, temperature=0.5, top_p=0.5,
                                            stop=("a", "b"), seed=3)
    assert second.tenant == "openai-api"  # a header claiming a tenant is ignored
    assert second.sampling == SamplingParams(max_new_tokens=512, temperature=1.0, top_p=1.0)
    # Through the client (without keys): one tenant; the user kept apart, not disclosed.
    assert third.tenant == "openai-api"
    assert third.user and third.user != "u1"
    assert third.sampling == SamplingParams(max_new_tokens=100, temperature=0.3, top_p=0.9,
                                            stop=("x",), seed=5)


# -- both real ends: the tiny model -------------------------------------------------------


async def test_tiny_model_over_http_matches_local(tiny_model_dir: Path) -> None:
    settings = parse_settings({"bot": {"name": "tbot"}, "generation": {
        "model": str(tiny_model_dir), "device": "cpu", "dtype": "float32",
        "temperature": 0.0}})
    async with LocalGenerator(settings) as local, api(local) as url, client(url) as remote:
        for text, max_new in (("Hello there", 100), ("hi", 12)):
            direct = await collect(local.stream(request(text, max_new)))
            over_http = await collect(remote.stream(request(text, max_new)))
            assert text_of(over_http) == text_of(direct)
            assert over_http[-1].finish_reason == direct[-1].finish_reason
            assert len(over_http) > 2  # it streamed, piece by piece
        assert direct[-1].finish_reason == "length"  # "hi" runs on: max_tokens cut it

        # A stop string taken from the middle of the free-running answer.
        free = text_of(await collect(local.stream(request("hi", 40))))
        stop = free[len(free) // 2 :][:4]
        direct = await collect(local.stream(request("hi", 40, stop=(stop,))))
        over_http = await collect(remote.stream(request("hi", 40, stop=(stop,))))
        assert text_of(over_http) == text_of(direct)
        assert stop not in text_of(over_http) and len(text_of(over_http)) < len(free)
        assert over_http[-1].finish_reason == "stop"

        async with aiohttp.ClientSession() as http:
            body = chat_body("Hello there", max_tokens=100, temperature=0)
            async with http.post(f"{url}/chat/completions", json=body) as response:
                answer = await response.json()
        reference = text_of(await collect(local.stream(request("Hello there", 100))))
        assert answer["choices"][0]["message"]["content"] == reference


async def test_the_openai_package_as_a_client(echo_api: str) -> None:
    openai = pytest.importorskip("openai")  # not a dependency: runs where it is installed
    sdk = openai.AsyncOpenAI(base_url=echo_api, api_key="unused", max_retries=0)
    try:
        stream = await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello big world"}], stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == "hello big world"
        answer = await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "one two three"}], max_tokens=2
        )
        assert answer.choices[0].message.content == "one two"
        assert answer.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError):
            await sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]
            )
    finally:
        await sdk.close()


# -- what the server refuses ------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    ("not json", b"{nope", 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("not utf-8", b'{"model": "\xff"}', 400, None),
    ("NaN", b'{"model": "m", "messages": [], "temperature": NaN}', 400, None),
    ("no model", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("no messages", {"model": MODEL}, 400, "messages"),
    ("empty messages", chat_body() | {"messages": []}, 400, "messages"),
    ("tool role", chat_body() | {"messages": [{"role": "tool", "content": "x",
                                               "tool_call_id": "1"}]}, 400, "messages[0].role"),
    ("unknown role", chat_body() | {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("image part", chat_body() | {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400,
     "messages[0].content"),
    ("content null", chat_body() | {"messages": [{"role": "assistant", "content": None}]}, 400,
     "messages[0].content"),
    ("content number", chat_body() | {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("lone surrogate", b'{"model": "parley-test", "messages": [{"role": "user", '
                       b'"content": "\\ud800"}]}', 400, "messages[0].content"),
    ("temperature text", chat_body(temperature="1"), 400, "temperature"),
    ("temperature high", chat_body(temperature=2.5), 400, "temperature"),
    ("top_p zero", chat_body(top_p=0), 400, "top_p"),
    ("max_tokens zero", chat_body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens float", chat_body(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens bool", chat_body(max_tokens=True), 400, "max_tokens"),
    ("empty stop", chat_body(stop=""), 400, "stop[0]"),
    ("many stops", chat_body(stop=["s"] * 17), 400, "stop"),
    ("stream text", chat_body(stream="yes"), 400, "stream"),
    ("n=2", chat_body(n=2), 400, "n"),
    ("frequency penalty", chat_body(frequency_penalty=0.5), 400, "frequency_penalty"),
    ("negative presence", chat_body(presence_penalty=-0.5), 400, "presence_penalty"),
    ("repetition below 1", chat_body(repetition_penalty=0.9), 400, "repetition_penalty"),
    ("tools", chat_body(tools=[]), 400, "tools"),
    ("unknown model", chat_body() | {"model": "gpt-4o"}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
async def test_bad_requests(
    echo_api: str, http: aiohttp.ClientSession, body: Any, status: int, param: str | None
) -> None:
    kwargs: dict[str, Any] = (
        {"json": body} if isinstance(body, dict)
        else {"data": body, "headers": {"Content-Type": "application/json"}}
    )
    async with http.post(f"{echo_api}/chat/completions", **kwargs) as response:
        assert response.status == status
        error = await openai_error(response)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


async def openai_error(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The ``error`` object of an OpenAI-shaped error response, checked for shape."""
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


async def test_refused_media_size_and_routes(echo_api: str, http: aiohttp.ClientSession) -> None:
    url = f"{echo_api}/chat/completions"
    payload = json.dumps(chat_body()).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "application/json; charset=latin-1"):
        async with http.post(url, data=payload, headers={"Content-Type": content_type}) as r:
            assert r.status == 415
            await openai_error(r)
    big = json.dumps(chat_body("x" * MAX_BODY_BYTES)).encode()
    json_type = {"Content-Type": "application/json"}
    async with http.post(url, data=io.BytesIO(big), headers=json_type) as r:
        assert r.status == 413
        assert (await openai_error(r))["code"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap still holds
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    async with http.post(url, data=chunks(), headers=json_type) as r:
        assert r.status == 413
    async with http.get(url) as r:
        assert r.status == 405
        assert r.headers["Allow"] == "POST"
        await openai_error(r)
    async with http.post(f"{echo_api}/completions", json=chat_body()) as r:
        assert r.status == 404
        await openai_error(r)
    async with http.post(url, json=chat_body(), headers={"X-Parley-Tenant": "x" * 65}) as r:
        assert r.status == 200  # a tenant header is not read at all (see test_api_keys)


# -- failures on either side ------------------------------------------------------------


class FailingGenerator(EchoGenerator):
    """Fails before its first delta, with the error it is given."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        raise self.error
        yield TokenDelta("")  # pragma: no cover - makes this an async generator


async def test_busy_is_429_and_the_client_says_busy(http: aiohttp.ClientSession) -> None:
    generator = FailingGenerator(GeneratorBusy("queue full"))
    async with generator, api(generator) as url:
        for stream in (True, False):
            body = chat_body(stream=stream)
            async with http.post(f"{url}/chat/completions", json=body) as response:
                assert response.status == 429
                assert int(response.headers["Retry-After"]) > 0
                assert (await openai_error(response))["type"] == "rate_limit_error"
        async with client(url) as gen:
            with pytest.raises(GeneratorBusy, match="queue full"):
                await collect(gen.stream(request("hi")))


async def test_generation_error_is_500_and_the_client_fails(
    http: aiohttp.ClientSession,
) -> None:
    generator = FailingGenerator(GenerationError("the model fell over"))
    async with generator, api(generator) as url:
        async with http.post(f"{url}/chat/completions", json=chat_body()) as response:
            assert response.status == 500
            assert (await openai_error(response))["type"] == "server_error"
        async with client(url) as gen:
            with pytest.raises(GenerationError, match="the model fell over") as caught:
                await collect(gen.stream(request("hi")))
    assert not isinstance(caught.value, GeneratorBusy)


async def test_failure_mid_stream_is_an_error_chunk(http: aiohttp.ClientSession) -> None:
    class Breaks(EchoGenerator):
        async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
            yield TokenDelta("partial")
            raise GenerationError("worker lost")

    async with Breaks() as generator, api(generator) as url:
        body = chat_body(stream=True)
        async with http.post(f"{url}/chat/completions", json=body) as response:
            assert response.status == 200
            raw = (await response.read()).decode()
        last = json.loads(raw.strip().split("\n\n")[-1].removeprefix("data: "))
        assert "worker lost" in last["error"]["message"]
        assert "[DONE]" not in raw
        async with client(url) as gen:
            deltas: list[TokenDelta] = []
            with pytest.raises(GenerationError, match="worker lost"):
                async for delta in gen.stream(request("hi")):
                    deltas.append(delta)
        assert text_of(deltas) == "partial"


async def test_a_restarted_generation(http: aiohttp.ClientSession) -> None:
    class Restarts(EchoGenerator):
        async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
            yield TokenDelta("lost")
            yield TokenDelta("second", restart=True)
            yield TokenDelta(" try", finish_reason="stop")

    async with Restarts() as generator, api(generator) as url:
        async with http.post(f"{url}/chat/completions", json=chat_body()) as response:
            answer = await response.json()
        assert answer["choices"][0]["message"]["content"] == "second try"
        # Streamed text cannot be taken back: the answer fails instead of being garbled.
        body = chat_body(stream=True)
        async with http.post(f"{url}/chat/completions", json=body) as response:
            raw = (await response.read()).decode()
        last = json.loads(raw.strip().split("\n\n")[-1].removeprefix("data: "))
        assert last["error"]["code"] == "generation_restarted"


async def test_server_down_fails_fast() -> None:
    async with client(f"http://127.0.0.1:{free_port()}/v1", max_retries=0) as gen:
        started = time.monotonic()
        with pytest.raises(GenerationError, match="cannot connect") as caught:
            await collect(gen.stream(request("hi")))
    assert time.monotonic() - started < 2.0
    assert not isinstance(caught.value, GeneratorBusy)


class SlowGenerator(EchoGenerator):
    """Streams a word every 20 ms, forever; says when its stream is entered and closed."""

    def __init__(self, first_delay: float = 0.0) -> None:
        super().__init__()
        self.first_delay = first_delay
        self.entered = asyncio.Event()
        self.closed = asyncio.Event()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        self.entered.set()
        try:
            await asyncio.sleep(self.first_delay)
            while True:
                yield TokenDelta("word ")
                await asyncio.sleep(0.02)
        finally:
            self.closed.set()


async def test_client_closing_early_closes_the_server_stream() -> None:
    generator = SlowGenerator()
    async with generator, api(generator) as url, client(url) as gen:
        async with closing(gen.stream(request("hi"))) as deltas:
            assert (await anext(deltas)).text == "word "
        await asyncio.wait_for(generator.closed.wait(), 5.0)


async def test_client_giving_up_before_the_first_token_cancels_it() -> None:
    generator = SlowGenerator(first_delay=3600)
    async with generator, api(generator) as url, client(url) as gen:
        task = asyncio.create_task(collect(gen.stream(request("hi"))))
        await asyncio.wait_for(generator.entered.wait(), 5.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.wait_for(generator.closed.wait(), 5.0)


# -- a far end that misbehaves ----------------------------------------------------------

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def fake_upstream(reply: Reply) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A server answering ``POST /v1/chat/completions`` with ``reply``; records requests."""
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append({"body": await request.json(), "headers": request.headers.copy()})
        return await reply(request)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with serve_app(app) as url:
        yield f"{url}/v1", seen


def sse_reply(*pieces: bytes, pause: float = 0.0) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(pause)
        await response.write_eof()
        return response

    return reply


def chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> bytes:
    if content is not None:
        delta["content"] = content
    body = {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n".encode()


async def test_client_parses_what_real_servers_send() -> None:
    multi_line = (b'data: {"choices": [{"index": 0,\r\n'
                  b'data:  "delta": {"content": " there"}}]}\r\n\r\n')
    stream = b"".join([
        b": keep-alive\n\n",
        chunk("", role="assistant"),
        # (No "id:" field: with one, the SDK's decoder turns the next keep-alive into an
        # empty event, which is not JSON; no server we know sends ids.)
        b"event: message\nretry: 10\n" + chunk("Hi"),
        b": ping\r\n\r\n",
        multi_line,
        chunk(None),  # a delta with no content (e.g. only a role): nothing to show
        b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\n',
        chunk("!", finish="tool_calls"),
        b"data: [DONE]\n\n",
    ])
    # One byte at a time: every line and CR LF is split across reads.
    reply = sse_reply(*(stream[i : i + 1] for i in range(len(stream))))
    async with fake_upstream(reply) as (url, seen):
        async with client(url, api_key="sk-test") as gen:
            req = GenerationRequest(
                (ChatMessage("system", "Be nice."), ChatMessage("user", "hello")),
                SamplingParams(max_new_tokens=7, temperature=0.2, top_p=0.8, stop=("\n",), seed=1),
                tenant="bot1", user="alice",
            )
            deltas = await collect(gen.stream(req))
    assert [(d.text, d.finish_reason) for d in deltas] == [
        ("Hi", None), (" there", None), ("!", "stop"),
    ]
    body, headers = seen[0]["body"], seen[0]["headers"]
    assert body == {
        "model": MODEL,
        "messages": [{"role": "system", "content": "Be nice."},
                     {"role": "user", "content": "hello"}],
        "stream": True, "max_tokens": 7, "temperature": 0.2, "top_p": 0.8, "stop": ["\n"],
        "seed": 1, "user": hashlib.sha256(b"bot1\0alice").hexdigest()[:32],
    }
    assert headers["Authorization"] == "Bearer sk-test"
    assert headers["X-Parley-Tenant"] == "bot1"


async def test_a_finished_answer_leaves_the_connection_for_the_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The wait for the answer's tail is 1 s; on a loaded test machine two 20 ms pauses
    # can outlast it, and then the connection is (rightly) closed, not reused.
    monkeypatch.setattr("core.generation.openai.client.WIND_DOWN_SECONDS", 30.0)
    peers: list[object] = []
    # What follows the final chunk comes a little later, as from a real server.
    finish = sse_reply(chunk("a", finish="stop"), b'data: {"choices": [], "usage": {}}\n\n',
                       b"data: [DONE]\n\n", pause=0.02)

    async def reply(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return await finish(request)

    async with fake_upstream(reply) as (url, _), client(url) as gen:
        for _ in range(3):
            deltas = await collect(gen.stream(request("hi")))
            assert [(d.text, d.finish_reason) for d in deltas] == [("a", "stop")]
    assert len(peers) == 3 and len(set(peers)) == 1


async def test_client_takes_a_whole_answer_from_a_server_ignoring_stream() -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": "all at once"},
            "finish_reason": "length"}]})

    async with fake_upstream(reply) as (url, seen), client(url) as gen:
        deltas = await collect(gen.stream(request("hi")))
    assert [(d.text, d.finish_reason) for d in deltas] == [("all at once", "length")]
    assert "Authorization" not in seen[0]["headers"]


MALFORMED: list[tuple[str, bytes, str]] = [
    ("not json", b"data: {garbage\n\n", "not JSON"),
    ("not an object", b"data: [1, 2]\n\n", "not an object"),
    ("no choices", b'data: {"id": "x"}\n\n', "without choices"),
    ("content a number", b'data: {"choices": [{"index": 0, "delta": {"content": 5}}]}\n\n',
     "malformed"),
    ("delta a string", b'data: {"choices": [{"index": 0, "delta": "hi"}]}\n\n', "malformed"),
    ("not utf-8", b'data: {"choices": "\xff\xfe"}\n\n', "not UTF-8"),
    ("error chunk", chunk("ok") + b'data: {"error": {"message": "out of memory"}}\n\n',
     "out of memory"),
    ("cut short", chunk("ok"), "ended the stream"),
    ("nothing", b"", "ended the stream"),
]


@pytest.mark.parametrize(("stream", "match"), [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
async def test_malformed_upstream_is_a_generation_error(stream: bytes, match: str) -> None:
    async with fake_upstream(sse_reply(stream)) as (url, _), client(url) as gen:
        with pytest.raises(GenerationError, match=match) as caught:
            await collect(gen.stream(request("hi")))
    assert not isinstance(caught.value, GeneratorBusy)


@pytest.mark.parametrize(("status", "body", "busy", "shown"), [
    (400, {"error": {"message": "context too long " * 50, "type": "invalid_request_error"}},
     False, "context too long context"),
    (401, {"error": {"message": "bad key"}}, False, "bad key"),
    (422, {"detail": "field required"}, False, "field required"),
    (500, "upstream crashed", False, "upstream crashed"),
    (429, {"error": {"message": "slow down"}}, True, "slow down"),
    (503, "overloaded", True, "overloaded"),
])
async def test_http_errors_are_mapped(status: int, body: Any, busy: bool, shown: str) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)

    async with fake_upstream(reply) as (url, _), client(url) as gen:
        with pytest.raises(GenerationError) as caught:
            await collect(gen.stream(request("hi")))
    message = str(caught.value)
    assert isinstance(caught.value, GeneratorBusy) == busy
    assert f"HTTP {status}: {shown}" in message
    assert len(message) < 500  # a long message from the server is cut short


async def test_no_first_byte_in_time_is_busy() -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    async with fake_upstream(reply) as (url, _), client(url, timeout=0.3) as gen:
        started = time.monotonic()
        with pytest.raises(GeneratorBusy, match="no answer"):
            await collect(gen.stream(request("hi")))
    assert time.monotonic() - started < 3.0


async def test_silence_mid_answer_is_a_generation_error() -> None:
    reply = sse_reply(chunk("a"), b": too late\n\n", pause=30)
    async with fake_upstream(reply) as (url, _), client(url, timeout=0.3) as gen:
        deltas: list[TokenDelta] = []
        started = time.monotonic()
        with pytest.raises(GenerationError, match="went silent") as caught:
            async for delta in gen.stream(request("hi")):
                deltas.append(delta)
    assert text_of(deltas) == "a"
    assert not isinstance(caught.value, GeneratorBusy)
    assert time.monotonic() - started < 3.0


async def test_total_time_is_capped() -> None:
    # Keep-alives every 50 ms: never silent, never finished.
    reply = sse_reply(chunk("a"), *[b": ping\n\n"] * 200, pause=0.05)
    async with fake_upstream(reply) as (url, _), client(url, total_timeout=0.5) as gen:
        started = time.monotonic()
        with pytest.raises(GenerationError, match="took over"):
            await collect(gen.stream(request("hi")))
    assert time.monotonic() - started < 3.0


# -- pieces -----------------------------------------------------------------------------


def test_config_and_registry() -> None:
    with pytest.raises(ConfigError, match=r"generation\.url"):
        OpenAIGenerator(parse_settings({"bot": {"name": "b"},
                                        "generation": {"backend": "openai"}}))
    with pytest.raises(ConfigError, match=r"generation\.url"):
        OpenAIGenerator(client_settings("redis://127.0.0.1:6379"))
    gen = generator_backends().get("openai")(client_settings("http://127.0.0.1:1/v1/"))
    assert isinstance(gen, OpenAIGenerator)
    assert gen.endpoint == "http://127.0.0.1:1/v1/chat/completions"


async def test_stream_before_start_fails() -> None:
    gen = OpenAIGenerator(client_settings("http://127.0.0.1:1/v1"))
    with pytest.raises(GenerationError, match="not started"):
        await collect(gen.stream(request("hi")))


# -- the SDK's retries, and what the user sees ------------------------------------------


async def test_a_429_is_retried_after_the_servers_retry_after() -> None:
    calls: list[float] = []

    async def reply(request: web.Request) -> web.StreamResponse:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return web.json_response({"error": {"message": "slow down"}}, status=429,
                                     headers={"Retry-After": "2"})
        return await sse_reply(chunk("after"), chunk(" waiting", finish="stop"),
                               b"data: [DONE]\n\n")(request)

    async with fake_upstream(reply) as (url, seen), client(url) as gen:
        deltas = await collect(gen.stream(request("hi")))
    assert text_of(deltas) == "after waiting" and deltas[-1].finish_reason == "stop"
    assert len(calls) == 2
    # The SDK's own first backoff is at most 0.5 s: 2 s is the server's word.
    assert calls[1] - calls[0] >= 1.9
    assert seen[0]["body"] == seen[1]["body"]


async def test_a_429_past_the_first_piece_timeout_is_busy() -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "queue full"}}, status=429,
                                 headers={"Retry-After": "60"})

    async with fake_upstream(reply) as (url, seen), client(url, timeout=0.5) as gen:
        with pytest.raises(GeneratorBusy, match="no answer"):
            await collect(gen.stream(request("hi")))
    assert len(seen) == 1  # still waiting out the Retry-After when the timeout struck


async def test_no_key_sends_no_authorization_and_nothing_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-of-whoever-runs-the-bot")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-secret")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-secret")
    async with fake_upstream(sse_reply(chunk("ok", finish="stop"))) as (url, seen):
        async with client(url) as gen:
            await collect(gen.stream(request("hi")))
    headers = seen[0]["headers"]
    assert "Authorization" not in headers
    assert "OpenAI-Organization" not in headers and "OpenAI-Project" not in headers
    assert not any("secret" in v or "whoever" in v for v in headers.values())


async def test_a_connection_dropped_mid_answer_gives_the_user_the_apology() -> None:
    from core.app import build_engine
    from core.engine import Apologies
    from core.engine import collect as collect_reply
    from core.types import IncomingMessage

    async def reply(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk("Half an answer and then"))
        assert request.transport is not None
        request.transport.abort()  # the server process dies
        return response

    async with fake_upstream(reply) as (url, _):
        engine = build_engine(client_settings(url))
        async with engine:
            message = IncomingMessage(bot="otest", channel="web", conversation_id="c1",
                                      user_id="u1", message_id="m1", text="hello?")
            answer = await collect_reply(engine.handle(message))
    assert answer.kind.value == "error"
    assert answer.text == Apologies().generation


async def test_the_bots_sampling_settings_reach_the_server() -> None:
    seen: list[GenerationRequest] = []
    shaped = SamplingParams(max_new_tokens=40, temperature=0.3, top_p=0.8, stop=("x",),
                            seed=4, repetition_penalty=1.15, no_repeat_ngram_size=3,
                            finish_sentence=True, max_sentences=2)
    async with Recorder(seen) as generator, api(generator) as url:
        for repetition in ("presence_penalty", "repetition_penalty", "off"):
            async with client(url, repetition=repetition) as gen:
                await collect(gen.stream(GenerationRequest(
                    (ChatMessage("user", "hi"),), shaped, tenant="otest", user="u1")))
    presence, native, off = (r.sampling for r in seen)
    # max_tokens has the quarter a reply may run over to end its sentence; the ending
    # itself is shaped on the client, so the server is not asked to.
    expected = SamplingParams(max_new_tokens=50, temperature=0.3, top_p=0.8, stop=("x",),
                              seed=4)
    assert native == dataclasses.replace(expected, repetition_penalty=1.15)
    assert off == expected
    assert presence.repetition_penalty == pytest.approx(1.15, abs=0.001)


async def test_no_repeat_ngram_size_reaches_the_server_when_asked_to() -> None:
    seen: list[GenerationRequest] = []
    sampling = SamplingParams(max_new_tokens=8, no_repeat_ngram_size=3)
    hi = (ChatMessage("user", "hi"),)
    async with Recorder(seen) as generator, api(generator) as url:
        for mode in ("no_repeat_ngram_size", "off"):
            async with client(url, no_repeat_ngram=mode) as gen:
                await collect(gen.stream(GenerationRequest(hi, sampling)))
    assert [r.sampling.no_repeat_ngram_size for r in seen] == [3, None]
    async with fake_upstream(sse_reply(chunk("Hi", finish="stop"))) as (url, bodies):
        for mode in ("vllm_xargs", "no_repeat_ngram_size", "off"):
            async with client(url, no_repeat_ngram=mode) as gen:
                await collect(gen.stream(GenerationRequest(hi, sampling)))
    xargs, field, off = (b["body"] for b in bodies)
    assert xargs["vllm_xargs"] == {"no_repeat_ngram_size": 3}
    assert "no_repeat_ngram_size" not in xargs
    assert field["no_repeat_ngram_size"] == 3 and "vllm_xargs" not in field
    assert not {"no_repeat_ngram_size", "vllm_xargs"} & set(off)


SENTENCES = "One two. Three four five. Six seven. Eight nine ten eleven twelve."


@pytest.mark.parametrize(("sampling", "shown"), [
    # Ends after two sentences.
    ({"max_sentences": 2}, "One two. Three four five."),
    # From 3/4 of 10 tokens (the 8th piece) on, the reply ends at its next sentence end.
    ({"max_new_tokens": 10, "finish_sentence": True}, "One two. Three four five. Six seven."),
    # Without either: whatever the server sends.
    ({}, SENTENCES),
])
async def test_replies_end_at_a_sentence_as_on_the_local_backend(
    sampling: dict[str, Any], shown: str,
) -> None:
    generator = SlowGeneratorOf(SENTENCES)
    async with generator, api(generator) as url, client(url) as gen:
        params = {"max_new_tokens": 100, "temperature": 0.0, **sampling}
        deltas = await collect(gen.stream(GenerationRequest(
            (ChatMessage("user", "count"),), SamplingParams(**params))))
        assert text_of(deltas) == shown
        assert deltas[-1].finish_reason == "stop"
        if shown != SENTENCES:  # the server was told to stop: nobody is listening
            await asyncio.wait_for(generator.closed.wait(), 5.0)


class SlowGeneratorOf(EchoGenerator):
    """Streams ``text`` word by word, 20 ms apart, whatever it is asked; says when closed."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.words = text.split(" ")
        self.closed = asyncio.Event()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        try:
            for i, word in enumerate(self.words):
                last = i == len(self.words) - 1
                yield TokenDelta(word if i == 0 else f" {word}",
                                 finish_reason="stop" if last else None)
                await asyncio.sleep(0.02)
        finally:
            self.closed.set()

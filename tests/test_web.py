"""The web channel over real HTTP on loopback: the API, streaming, and what it refuses."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_log import AccessLogger

from bots.base import split_message
from bots.web.adapter import WebAdapter
from bots.web.server import AccessLog
from core.app import build_engine
from core.config import BotSettings, parse_settings
from core.engine import Engine
from core.errors import ConfigError, GenerationError, GeneratorBusy, MemoryUnavailable
from core.generation.base import GenerationRequest, TokenDelta
from core.memory.base import Begun, MemorySnapshot, memory_backends
from core.moderation.base import PassThroughModerator
from core.plugins import PluginRegistry
from core.types import ConversationKey, Turn

BOT = "webtest"
MAX_CHARS = 200
SOURCE = "config/webtest.toml"


def make_settings(generation: str = "echo") -> BotSettings:
    """Settings of a small echo bot with embedded memory."""
    return parse_settings(
        {
            "bot": {"name": BOT, "max_message_chars": MAX_CHARS},
            "generation": {"backend": generation},
            "memory": {"backend": "embedded"},
        },
        source=SOURCE,
    )


@dataclass
class Site:
    """A running web adapter, its engine, and a client session to call it with."""

    engine: Engine
    adapter: WebAdapter
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.adapter.port}"

    def chat(self, body: Any, path: str = "/api/v1/chat", **kwargs: Any) -> Any:
        """POST ``body``: a dict as JSON, anything else (bytes, chunks) as it is."""
        if isinstance(body, dict):
            return self.http.post(self.url + path, json=body, **kwargs)
        kwargs.setdefault("headers", {"Content-Type": "application/json"})
        return self.http.post(self.url + path, data=body, **kwargs)

    async def turns(self, conversation_id: str) -> tuple[Turn, ...]:
        key = ConversationKey(BOT, "web", conversation_id)
        return (await self.engine.memory.load(key, "u1")).turns

    def handled(self) -> float:
        """How many messages the engine has handled, whatever the outcome."""
        return sum(
            sample.value
            for metric in self.engine.metrics.registry.collect()
            for sample in metric.samples
            if sample.name == "parley_messages_total"
        )


@asynccontextmanager
async def serving(engine: Engine, section: Mapping[str, Any] | None = None) -> AsyncIterator[Site]:
    async with engine:
        adapter = WebAdapter(engine.settings, {"port": 0, **(section or {})})
        await adapter.start(engine)
        try:
            async with aiohttp.ClientSession() as http:
                yield Site(engine, adapter, http)
        finally:
            await adapter.stop()


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    async with serving(build_engine(make_settings())) as running:
        yield running


def msg(text: Any = "hello there", **fields: Any) -> dict[str, Any]:
    return {"conversation_id": "c1", "user_id": "u1", "text": text, **fields}


async def read_events(response: aiohttp.ClientResponse) -> list[tuple[str, dict[str, Any]]]:
    """The Server-Sent Events of ``response``, as (event, data) pairs."""
    events = []
    for block in (await response.text()).split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            events.append((fields["event"], json.loads(fields["data"])))
    return events


# -- the happy paths ------------------------------------------------------------------


async def test_chat_round_trip(site: Site) -> None:
    async with site.chat(msg("hello there")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        body = await response.json()
    assert body["kind"] == "final"
    assert body["text"] == "hello there"
    assert body["action"] == "allow"
    assert body["conversation_id"] == "c1"
    assert re.fullmatch(r"[0-9a-f]{32}", body["message_id"])
    assert "code" not in body


async def test_conversation_is_remembered(site: Site) -> None:
    for text in ("first message", "second message"):
        async with site.chat(msg(text)) as response:
            assert response.status == 200
    turns = await site.turns("c1")
    assert [(t.role, t.text) for t in turns] == [
        ("user", "first message"),
        ("assistant", "first message"),
        ("user", "second message"),
        ("assistant", "second message"),
    ]
    assert turns[0].user_id == "u1"


async def test_redelivered_message_is_answered_once(site: Site) -> None:
    async with site.chat(msg(message_id="m-1")) as response:
        first = await response.json()
        assert first["message_id"] == "m-1"
    async with site.chat(msg(message_id="m-1")) as response:
        assert response.status == 200
        body = await response.json()
    # The stored reply again (idempotent replay), marked as a duplicate.
    assert (body["kind"], body["code"], body["text"]) == ("final", "duplicate", first["text"])
    assert len(await site.turns("c1")) == 2


async def test_stream_sends_deltas_then_final(site: Site) -> None:
    text = "one two three four five"
    async with site.chat(msg(text), path="/api/v1/chat/stream") as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        events = await read_events(response)
    kinds = [kind for kind, _ in events]
    deltas = [data["text"] for kind, data in events if kind == "delta"]
    assert len(deltas) >= 3
    assert kinds[-1] == "final" and kinds.count("final") == 1
    assert set(kinds) == {"delta", "final"}
    assert "".join(deltas).strip() == events[-1][1]["text"] == text
    assert len(await site.turns("c1")) == 2


async def test_stream_refusal_is_a_json_error(site: Site) -> None:
    async with site.chat(msg("   "), path="/api/v1/chat/stream") as response:
        assert response.status == 400
        assert (await response.json())["code"] == "invalid_input"


async def test_healthz_metrics_and_page(site: Site) -> None:
    async with site.http.get(site.url + "/healthz") as response:
        assert await response.json() == {"status": "ok", "bot": BOT}
    async with site.chat(msg()) as response:
        assert response.status == 200
    async with site.http.get(site.url + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        assert 'parley_messages_total{bot="webtest",channel="web",outcome="answered"} 1.0' in (
            await response.text()
        )
    async with site.http.get(site.url + "/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
        csp = response.headers["Content-Security-Policy"]
    assert '<script src="/widget.js"' in page
    assert "unsafe-inline" not in csp and "script-src 'self'" in csp
    assert "<style" not in page and not re.search(r"<script(?![^>]*\ssrc=)", page)  # no inline
    # Nothing external is loaded (the snippet shown on the page is text, not a tag).
    assert not re.search(r"""<[a-z]+[^>]*\s(src|href)\s*=\s*["']?(https?:)?//""", page)


async def test_api_errors_are_json(site: Site) -> None:
    async with site.http.get(site.url + "/api/v1/nowhere") as response:
        assert response.status == 404
        assert "error" in await response.json()
    async with site.http.get(site.url + "/api/v1/chat") as response:
        assert response.status == 405
        assert "POST" in response.headers["Allow"]
        assert "error" in await response.json()


async def test_cors_only_for_configured_origins() -> None:
    allowed, other = "https://shop.example", "https://evil.example"
    engine = build_engine(make_settings())
    async with serving(engine, {"cors_origins": [allowed]}) as site:
        for origin, expected in ((allowed, allowed), (other, None)):
            headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
            async with site.http.options(site.url + "/api/v1/chat", headers=headers) as response:
                assert response.status == 204
                assert response.headers.get("Access-Control-Allow-Origin") == expected
            async with site.chat(msg(), headers={"Origin": origin}) as response:
                assert response.headers.get("Access-Control-Allow-Origin") == expected


# -- what the adapter refuses ---------------------------------------------------------

JSON = "application/json"
BAD_REQUESTS: dict[str, tuple[Any, str, int, str, bool]] = {
    # name: (body, content type, status, words in the error, reaches the engine)
    "empty text": (msg(""), JSON, 400, "empty", True),
    "whitespace-only text": (msg(" \n\t "), JSON, 400, "empty", True),
    "text over max_message_chars": (msg("x" * (MAX_CHARS + 1)), JSON, 400, "too long", True),
    "NUL in text": (msg("a\x00b"), JSON, 400, "control", True),
    "escape in text": (msg("\x1b[31mred"), JSON, 400, "control", True),
    "lone surrogate in text": (b'{"conversation_id": "c1", "user_id": "u1", "text": "\\ud800"}',
                               JSON, 400, "UTF-8", True),
    "1 MiB text": (msg("x" * 1024 * 1024), JSON, 413, "at most", False),
    "invalid UTF-8": (b'{"conversation_id": "c1", "user_id": "u1", "text": "\xff\xfe"}',
                      JSON, 400, "UTF-8", False),
    "malformed JSON": (b'{"conversation_id": "c1", "text": ', JSON, 400, "JSON", False),
    "deeply nested JSON": (b"[" * 30_000, JSON, 400, "JSON", False),
    "array instead of object": (b'["c1", "u1", "hi"]', JSON, 400, "object", False),
    "missing field": ({"conversation_id": "c1", "text": "hi"}, JSON, 400, "user_id", False),
    "wrong type": (msg(42), JSON, 400, "text", False),
    "unknown field": (msg(colour="red"), JSON, 400, "colour", False),
    "id too long": (msg(conversation_id="c" * 257), JSON, 400, "conversation_id", False),
    "control character in id": (msg(user_id="u\x1b1"), JSON, 400, "user_id", False),
    "blank id": (msg(conversation_id="  "), JSON, 400, "conversation_id", False),
    "text/plain": (b'{"conversation_id": "c1", "user_id": "u1", "text": "hi"}', "text/plain",
                   415, "Content-Type", False),
    "form data": (b"conversation_id=c1&user_id=u1&text=hi",
                  "application/x-www-form-urlencoded", 415, "Content-Type", False),
    "JSON in latin-1": (b'{"conversation_id": "c1", "user_id": "u1", "text": "hi"}',
                        "application/json; charset=latin-1", 415, "UTF-8", False),
}


@pytest.mark.parametrize("path", ["/api/v1/chat", "/api/v1/chat/stream"])
@pytest.mark.parametrize("case", BAD_REQUESTS)
async def test_bad_request_is_refused_and_nothing_is_stored(
    site: Site, case: str, path: str
) -> None:
    body, content_type, status, words, reaches_engine = BAD_REQUESTS[case]
    raw = body if isinstance(body, bytes) else json.dumps({**body, "message_id": "m-1"}).encode()
    async with site.chat(raw, path=path, headers={"Content-Type": content_type}) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        error = (await response.json())["error"]
    assert words.lower() in error.lower()
    assert site.handled() == (1 if reaches_engine else 0)
    assert await site.turns("c1") == ()
    # Not even the message id was kept: the same id is answered once the message is fine.
    async with site.chat(msg("fine now", message_id="m-1")) as response:
        assert (await response.json())["kind"] == "final"


async def test_chunked_body_over_the_cap_is_refused(site: Site) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap applies as read
        yield b'{"conversation_id": "c1", "user_id": "u1", "text": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    async with site.chat(chunks()) as response:
        assert response.status == 413
        assert (await response.json())["code"] == "payload_too_large"
    assert site.handled() == 0


# -- failures behind the engine -------------------------------------------------------


class Failing:
    """A generator that fails with ``exc`` as soon as it is asked."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        raise self.exc
        yield TokenDelta("")  # pragma: no cover - makes this an async generator


class Stalling(Failing):
    """A generator that says one word, then thinks forever until it is closed."""

    def __init__(self) -> None:
        super().__init__(RuntimeError("unused"))
        self.closed = asyncio.Event()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        try:
            yield TokenDelta("Well ")
            await asyncio.Event().wait()
        finally:
            self.closed.set()


def engine_with(generator: Any = None, memory: Any = None) -> Engine:
    settings = make_settings()
    return Engine(
        settings,
        memory=memory or memory_backends().get("embedded")(settings),
        generator=generator,
        moderator=PassThroughModerator(),
        plugins=PluginRegistry(),
    )


class ForgetfulMemory:
    """The embedded memory, except that loading a conversation fails."""

    def __init__(self, settings: BotSettings) -> None:
        self.inner = memory_backends().get("embedded")(settings)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def load(self, key: ConversationKey, user_id: str) -> MemorySnapshot:
        raise MemoryUnavailable("the store is down")

    async def begin(
        self, key: ConversationKey, message_id: str, user_id: str, token: str
    ) -> Begun:
        raise MemoryUnavailable("the store is down")


@pytest.mark.parametrize(
    ("make_engine", "code"),
    [
        (lambda: engine_with(Failing(GeneratorBusy("queue full"))), "busy"),
        (lambda: engine_with(Failing(GenerationError("model crashed"))), "generation_failed"),
        (lambda: engine_with(Stalling(), ForgetfulMemory(make_settings())), "memory_unavailable"),
    ],
    ids=["busy", "generation_failed", "memory_unavailable"],
)
async def test_failures_behind_the_engine_are_503_with_an_apology(
    make_engine: Callable[[], Engine], code: str
) -> None:
    async with serving(make_engine()) as site:
        for path in ("/api/v1/chat", "/api/v1/chat/stream"):
            async with site.chat(msg(), path=path) as response:
                assert response.status == 503
                assert int(response.headers["Retry-After"]) > 0
                assert response.headers["Content-Type"] == "application/json; charset=utf-8"
                body = await response.json()
            assert body["code"] == code
            assert body["kind"] == "error"
            assert body["text"].startswith("Sorry")


async def test_a_flood_is_429_with_retry_after() -> None:
    settings = make_settings().model_copy(update={"moderation": parse_settings({
        "bot": {"name": BOT},
        "moderation": {"backend": "filters", "input_filters": ["flood"], "user_rate": 2},
    }).moderation})
    async with serving(build_engine(settings)) as site:
        for i in range(2):
            async with site.chat(msg(f"hello {i}")) as response:
                assert response.status == 200
        async with site.chat(msg("hello again")) as response:
            assert response.status == 429
            assert int(response.headers["Retry-After"]) > 0
            body = await response.json()
        assert (body["code"], body["action"]) == ("slow_down", "block")
        assert body["text"] == settings.moderation.flood_reply
        assert [t.text for t in await site.turns("c1")] == ["hello 0", "hello 0",
                                                           "hello 1", "hello 1"]


async def test_client_leaving_a_stream_cancels_the_generation() -> None:
    generator = Stalling()
    async with serving(engine_with(generator)) as site:
        response = await site.chat(msg(), path="/api/v1/chat/stream")
        async for line in response.content:
            if line.startswith(b"event: delta"):
                break
        response.close()  # drops the connection mid-reply
        await asyncio.wait_for(generator.closed.wait(), timeout=5)
        assert await site.turns("c1") == ()


# -- configuration and lifecycle ------------------------------------------------------


async def test_each_request_gets_aiohttps_access_log_line(
        site: Site, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    async with site.chat(msg("hello there"), headers={"User-Agent": "game/1.0"}) as response:
        await response.read()
    [record] = [r for r in caplog.records if r.name == "aiohttp.access"]
    assert re.fullmatch(r'127\.0\.0\.1 \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                        r'"POST /api/v1/chat HTTP/1\.1" 200 \d+ "-" "game/1\.0"',
                        record.getMessage())
    assert record.response_status == 200  # type: ignore[attr-defined]


async def test_access_log_false_writes_no_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    async with serving(build_engine(make_settings()), {"access_log": False}) as site:
        async with site.chat(msg("hello there")) as response:
            assert response.status == 200
            await response.read()
    assert [r for r in caplog.records if r.name == "aiohttp.access"] == []


def test_the_access_log_line_is_aiohttps_own() -> None:
    """AccessLog writes what aiohttp's AccessLogger would (in its default format)."""
    request = make_mocked_request("GET", "/api/v1/chat/messages?after=3", headers={
        "Referer": "https://shop.example/", "User-Agent": "Mozilla/5.0 (X11)"})
    response = web.Response(text="{}", status=404)
    ours, theirs = logging.getLogger("test.ours"), logging.getLogger("test.theirs")
    got: dict[str, logging.LogRecord] = {}

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got[record.name] = record

    for logger in (ours, theirs):
        logger.addHandler(Keep())
        logger.setLevel(logging.INFO)
    for _ in range(3):  # the two lines were made in the same second (almost always)
        AccessLog(ours).log(request, response, 0.25)
        AccessLogger(theirs).log(request, response, 0.25)
        if got["test.ours"].getMessage() == got["test.theirs"].getMessage():
            break
    assert got["test.ours"].getMessage() == got["test.theirs"].getMessage()
    fields = ("remote_address", "request_start_time", "first_request_line",
              "response_status", "response_size", "request_header")
    assert ({f: getattr(got["test.ours"], f) for f in fields}
            == {f: getattr(got["test.theirs"], f) for f in fields})


def test_config_errors_name_the_file_and_key() -> None:
    settings = make_settings()
    with pytest.raises(ConfigError, match=r"config/webtest\.toml: adapters\.web\.port: "):
        WebAdapter(settings, {"port": "abc"})
    with pytest.raises(ConfigError, match=r"adapters\.web\.prot: unknown key"):
        WebAdapter(settings, {"prot": 8080})
    with pytest.raises(ConfigError, match=r"adapters\.web\.port"):
        WebAdapter(settings, {"port": 70000})


async def test_lifecycle_is_idempotent_and_wait_ends_at_stop(site: Site) -> None:
    await site.adapter.start(site.engine)  # already started: nothing happens
    port = site.adapter.port
    waiting = asyncio.create_task(site.adapter.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    # A second adapter on the same port fails with a readable error, and cleans up.
    clash = WebAdapter(site.engine.settings, {"port": port})
    with pytest.raises(ConfigError, match=rf"adapters\.web: cannot listen on 127\.0\.0\.1:{port}"):
        await clash.start(site.engine)
    await site.adapter.stop()
    await site.adapter.stop()
    await asyncio.wait_for(waiting, timeout=5)
    with pytest.raises(RuntimeError):
        _ = site.adapter.port


def test_constructing_does_not_listen() -> None:
    adapter = WebAdapter(make_settings(), {"port": 0})
    with pytest.raises(RuntimeError, match="not started"):
        _ = adapter.port


# -- split_message --------------------------------------------------------------------


def assert_split_keeps_text(text: str, parts: list[str], limit: int) -> None:
    """Each part fits and is not blank; in order, they are ``text`` less cut whitespace."""
    pos = 0
    for part in parts:
        assert 0 < len(part) <= limit and part.strip()
        while not text.startswith(part, pos):
            assert text[pos].isspace(), (text, parts)
            pos += 1
        pos += len(part)
    assert not text[pos:].strip()


def test_split_message_prefers_paragraphs_then_lines_then_words() -> None:
    assert split_message("short", 10) == ["short"]
    assert split_message("", 10) == []
    assert split_message(" \n ", 10) == []
    assert split_message("first para\n\nsecond para", 15) == ["first para", "second para"]
    assert split_message("line one\nline two", 12) == ["line one", "line two"]
    assert split_message("one two three four", 9) == ["one two", "three", "four"]
    assert split_message("one two", 3) == ["one", "two"]
    assert split_message("code:\n    indented line", 20) == ["code:", "    indented line"]


def test_split_message_cuts_a_word_longer_than_the_limit() -> None:
    assert split_message("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert split_message("hi " + "y" * 12, 5) == ["hi", "yyyyy", "yyyyy", "yy"]


def test_split_message_never_loses_text() -> None:
    rng = random.Random(1234)
    pieces = ["a", "bb", "word", "longerword", "supercalifragilistic", " ", "  ", "\n", "\n\n"]
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        limit = rng.randint(1, 40)
        assert_split_keeps_text(text, split_message(text, limit), limit)


def test_split_message_rejects_a_useless_limit() -> None:
    with pytest.raises(ValueError):
        split_message("text", 0)

"""Helpers for the web widget's tests: a bot served on loopback, and a client for its API.

The generator is the echo generator; :class:`GatedEcho` holds a reply half-way until the
test lets it go, so a test can reload or reconnect in the middle of a reply without
racing it. It stands in for the model (the far end), not for anything under test.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bots.web.adapter import WebAdapter
from core.app import build_engine
from core.config import BotSettings, parse_settings
from core.engine import Engine
from core.generation.base import GenerationRequest, TokenDelta
from core.generation.echo import EchoGenerator

BOT = "widgettest"
SECRET = "test-secret-0123456789abcdef"
GATE_WORD = "SLOW"  # a message containing it is held after its first words


def widget_settings(memory: Mapping[str, Any] | None = None,
                    moderation: str = "passthrough") -> BotSettings:
    """An echo bot; embedded memory unless ``memory`` says otherwise."""
    return parse_settings(
        {
            "bot": {"name": BOT},
            "generation": {"backend": "echo", "max_new_tokens": 4096},
            "memory": dict(memory or {"backend": "embedded"}),
            "moderation": {"backend": moderation},
        },
        source="config/widgettest.toml",
    )


class GatedEcho(EchoGenerator):
    """The echo generator, except that a message containing ``SLOW`` stops after
    ``before`` words until :attr:`gate` is set (and :attr:`holding` tells it got there)."""

    def __init__(self, before: int = 3) -> None:
        super().__init__()
        self.before = before
        self.gate = asyncio.Event()
        self.holding = asyncio.Event()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Echo, held half-way for gated messages."""
        gated = GATE_WORD in request.messages[-1].content
        count = 0
        async for delta in super().stream(request):
            if gated and count == self.before:
                self.holding.set()
                await self.gate.wait()
            count += 1
            yield delta


def gated_engine(settings: BotSettings, generator: GatedEcho) -> Engine:
    """``settings``' engine with ``generator`` answering."""
    engine = build_engine(settings)
    return Engine(settings, memory=engine.memory, generator=generator,
                  moderator=engine.moderator, plugins=engine.plugins)


@dataclass
class Served:
    """A running web adapter and its URL."""

    engine: Engine
    adapter: WebAdapter
    http: aiohttp.ClientSession
    origin: str = "http://page.test"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.adapter.port}"

    async def session(self, body: Mapping[str, Any] | None = None,
                      origin: str | None = None) -> dict[str, Any]:
        """A new session's answer (token, conversation id, theme)."""
        async with self.http.post(self.url + "/api/v1/session", json=dict(body or {}),
                                  headers={"Origin": origin or self.origin}) as response:
            data: dict[str, Any] = await response.json()
            data["status"] = response.status
            return data

    def socket(self, token: str | None, origin: str | None = None,
               **kwargs: Any) -> Any:
        """Open the WebSocket API as a browser would (token as a subprotocol)."""
        protocols = ["parley.v1"] + ([f"bearer.{token}"] if token is not None else [])
        return self.http.ws_connect(self.url + "/api/v1/ws", protocols=protocols,
                                    origin=origin or self.origin, **kwargs)


@asynccontextmanager
async def serving(engine: Engine, section: Mapping[str, Any] | None = None,
                  origin: str = "http://page.test") -> AsyncIterator[Served]:
    """``engine`` behind a web adapter on a free loopback port, ``origin`` allowed."""
    config = {"port": 0, "secret": SECRET, "allowed_origins": [origin], **(section or {})}
    async with engine:
        adapter = WebAdapter(engine.settings, config)
        await adapter.start(engine)
        try:
            async with aiohttp.ClientSession() as http:
                yield Served(engine, adapter, http, origin)
        finally:
            await adapter.stop()


async def frames_until(ws: Any, done: Any, seconds: float = 10.0) -> list[dict[str, Any]]:
    """Frames received until ``done(frame)`` is true (that one included); an
    ``events`` frame counts as one ``event`` frame per event in it."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(seconds):
        while True:
            message = await ws.receive()
            if message.type is not aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"socket ended: {message.type} {message.data!r}")
            frame = json.loads(message.data)
            # Events come in batches; each is looked at (and returned) as its own frame.
            for one in ([{"type": "event", **e} for e in frame["events"]]
                        if frame["type"] == "events" else [frame]):
                got.append(one)
                if done(one):
                    return got


def shown(events: list[dict[str, Any]]) -> str:
    """The text a widget shows for one reply after ``events``, as widget.js makes it:
    deltas add to it, a reset empties it, the reply's end replaces it."""
    text = ""
    for event in events:
        if event["kind"] == "delta":
            text += event["text"]
        elif event["kind"] == "reset":
            text = ""
        elif event["kind"] in ("final", "notice", "error", "message"):
            return str(event["text"])
    return text


def final_of(message_id: str) -> Any:
    """A ``frames_until`` condition: the reply to ``message_id`` has ended."""
    return lambda f: (f.get("type") == "event" and f.get("message_id") == message_id
                      and f.get("kind") in ("final", "notice", "error"))


@asynccontextmanager
async def serving_settings(settings: BotSettings) -> AsyncIterator[tuple[Engine, WebAdapter, str]]:
    """``settings``' own bot (``build_engine``) behind its ``[adapters.web]``, started;
    yields the engine, the adapter and the server's URL."""
    async with build_engine(settings) as engine:
        adapter = WebAdapter(settings, settings.adapters["web"])
        await adapter.start(engine)
        try:
            yield engine, adapter, f"http://127.0.0.1:{adapter.port}"
        finally:
            await adapter.stop()


async def open_widget(http: aiohttp.ClientSession, url: str,
                      token: str | None = None) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """A widget on the bot's own page: a new session (or ``token``'s), its socket
    resumed from nothing; returns the session, the socket and the history it got."""
    session: dict[str, Any] = {"token": token}
    if token is None:
        async with http.post(url + "/api/v1/session", json={},
                             headers={"Origin": url}) as response:
            session = await response.json()
    ws = await http.ws_connect(url + "/api/v1/ws", origin=url,
                               protocols=["parley.v1", f"bearer.{session['token']}"])
    await ws.send_json({"type": "resume", "after": 0})
    frames = await frames_until(ws, lambda f: f["type"] == "resumed")
    return session, ws, next(f for f in frames if f["type"] == "history")

"""The gateway half of :class:`bots.testing.discord.FakeDiscord`: one session at a time.

HELLO on connect; IDENTIFY starts a session (READY and the greeting events); RESUME
replays what the bot missed since the ``seq`` it names, then RESUMED; heartbeats are
acknowledged. The test interrupts with op 7 (:meth:`FakeGateway.reconnect`) or op 9
(:meth:`FakeGateway.invalidate_session`). Events dispatched while no bot is live wait in
the session log for the resume, as on Discord; a new session (IDENTIFY) starts empty.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

Json = dict[str, Any]
# What a new session starts with, given its id: (event, data) pairs, READY first.
Greeting = Callable[[str], list[tuple[str, Json]]]


@dataclass
class _Session:
    id: str
    events: list[Json] = field(default_factory=list)  # every dispatch, seq = index + 1
    invalid: bool = False


class FakeGateway:
    """Discord's gateway for one bot token; mounted by ``FakeDiscord`` at ``/gateway``."""

    def __init__(self, token: str, greeting: Greeting, *, heartbeat_interval: float) -> None:
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self.connections = 0  # sockets opened
        self.identified = 0  # IDENTIFYs accepted
        self.resumed = 0  # RESUMEs accepted
        self.replayed = 0  # events sent again on a resume although the bot had them
        self._greeting = greeting
        self._sessions = 0
        self._session: _Session | None = None
        self._outbox: asyncio.Queue[str] | None = None  # the live connection's
        self._live = asyncio.Event()  # a socket is identified or resumed
        self._redeliver = 0

    def dispatch(self, event: str, data: Json) -> None:
        """Send a DISPATCH event now, or keep it for the resume if the bot is away."""
        if self._session is None:
            raise RuntimeError("no gateway session yet: start the bot first")
        frame = {"op": 0, "t": event, "s": len(self._session.events) + 1, "d": data}
        self._session.events.append(frame)
        if self._live.is_set() and self._outbox is not None:
            self._outbox.put_nowait(json.dumps(frame))

    def send_raw(self, text: str) -> None:
        """Send ``text`` as a gateway frame as it is (malformed-event tests)."""
        if self._outbox is None:
            raise RuntimeError("the bot is not connected")
        self._outbox.put_nowait(text)

    def reconnect(self) -> None:
        """Op 7 RECONNECT: the bot must reconnect and resume."""
        self._interrupt({"op": 7, "d": None})

    def invalidate_session(self, *, resumable: bool = False) -> None:
        """Op 9 INVALID SESSION: the bot must identify again (or resume, if ``resumable``)."""
        if self._session is not None and not resumable:
            self._session.invalid = True
        self._interrupt({"op": 9, "d": resumable})

    def redeliver_on_resume(self, count: int) -> None:
        """On the next resume, replay the last ``count`` events the bot already had, too."""
        self._redeliver = count

    async def wait_live(self, within: float = 10.0) -> None:
        """Wait until a bot is identified or resumed on the gateway."""
        await asyncio.wait_for(self._live.wait(), within)

    def _interrupt(self, frame: Json) -> None:
        if self._outbox is None:
            raise RuntimeError("the bot is not connected")
        # Events from now on wait in the session log for the resume.
        self._live.clear()
        self._outbox.put_nowait(json.dumps(frame))

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """The aiohttp handler of the gateway's WebSocket."""
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        # One queue and one writer per connection keep frames in order.
        outbox: asyncio.Queue[str] = asyncio.Queue()
        writer = asyncio.create_task(_write(socket, outbox))
        interval = int(self.heartbeat_interval * 1000)
        outbox.put_nowait(json.dumps({"op": 10, "d": {"heartbeat_interval": interval}}))
        self.connections += 1
        try:
            async for msg in socket:
                if msg.type is not WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op, data = frame.get("op"), frame.get("d")
                if op == 1:
                    outbox.put_nowait(json.dumps({"op": 11}))
                elif op == 2:
                    await self._identify(socket, outbox, data)
                elif op == 6:
                    self._resume(outbox, data)
        finally:
            writer.cancel()
            if self._outbox is outbox:
                self._outbox = None
                self._live.clear()
        return socket

    async def _identify(
        self, socket: web.WebSocketResponse, outbox: asyncio.Queue[str], data: Json
    ) -> None:
        if data.get("token") != self.token:
            await socket.close(code=4004, message=b"Authentication failed.")
            return
        self.identified += 1
        self._live.clear()
        self._sessions += 1
        self._session = _Session(id=f"session-{self._sessions}")
        self._outbox = outbox
        for event, payload in self._greeting(self._session.id):
            self.dispatch(event, payload)
        self._go_live(outbox, self._session.events)

    def _resume(self, outbox: asyncio.Queue[str], data: Json) -> None:
        session = self._session
        if (session is None or session.invalid or data.get("token") != self.token
                or data.get("session_id") != session.id):
            outbox.put_nowait(json.dumps({"op": 9, "d": False}))
            return
        self.resumed += 1
        self._live.clear()
        self._outbox = outbox
        seen = int(data.get("seq") or 0)
        start = max(0, seen - self._redeliver)
        self.replayed += seen - start
        self._redeliver = 0
        resumed = {"op": 0, "t": "RESUMED", "s": len(session.events), "d": {}}
        self._go_live(outbox, [*session.events[start:], resumed])

    def _go_live(self, outbox: asyncio.Queue[str], frames: list[Json]) -> None:
        for frame in frames:
            outbox.put_nowait(json.dumps(frame))
        self._live.set()


async def _write(socket: web.WebSocketResponse, outbox: asyncio.Queue[str]) -> None:
    while not socket.closed:
        text = await outbox.get()
        try:
            await socket.send_str(text)
        except ConnectionError:
            return  # the session log keeps what was lost, for the resume

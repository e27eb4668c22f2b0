"""NPC talk over a WebSocket, ``GET /api/v1/npc/ws``, for game engines that keep one
connection open and type lines out as they come.

The handshake is a plugin route of the web channel, so it has the HTTP API's API keys:
``Authorization: Bearer KEY`` (a missing or wrong key gets 401 before any upgrade), and
an open socket counts as one of its key's requests in flight. A handshake from a web page
(one with an ``Origin`` header) is refused with 403: browsers cannot send the key on a
WebSocket, and without keys any site the player visits could talk through it; a game
running in a browser uses ``talk/stream`` instead. Frames are JSON text, at most
``MAX_FRAME_BYTES`` (a bigger one closes the socket with 1009); the heartbeat closes a
socket whose peer stopped answering.

Client to server::

    {"type": "talk", "id": "7", "npc": "mira", "player_id": "p1", "text": "...",
     "game_state": {...}}                         game_state optional, as over HTTP
    {"type": "bark", "id": "8", "npc": "bram", "event": "...", "game_state": {...}}
    {"type": "resume", "session": "...", "after": N}   first, after a dropped connection:
                                                 N = the last ``seq`` the game saw
    {"type": "ping"}

Server to client (``id`` is the request's; every frame but ready, resumed and pong
carries ``seq``, numbered per session)::

    {"type": "ready", "session", "npcs": [{"id", "name"}]}  once, first
    {"type": "delta", "id", "text"}              a piece of the line (tags held back: the
                                                 pieces joined are the final line)
    {"type": "reset", "id"}                      the line starts over: drop what was shown
    {"type": "final", "id", "npc", "player_id", "line", "emotion", "actions",
     "relationship", "kind"}                     as the answer of POST .../talk
    {"type": "error", "id"?, "code", "error"}    the request (or frame) was not answered
    {"type": "resumed", "session", "last": N}    after the frames the game missed
    {"type": "pong"}

Requests of one socket run at once (each with its own ``id``, at most ``MAX_LINES``);
lines of one (NPC, player) are still answered in order. A dropped connection does not
stop its lines: a new socket that resumes the session gets every frame it missed, once
(:mod:`plugins.npc.sessions`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from typing import Annotated, Any, Literal

from aiohttp import WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from core.plugins import Caller, Plugin
from core.types import IncomingMessage
from plugins.npc.api import Bark, Refused, Routes, Talk
from plugins.npc.cards import problems
from plugins.npc.sessions import Session, Sessions

log = logging.getLogger(__name__)

PATH = "/api/v1/npc/ws"
MAX_FRAME_BYTES = 64 * 1024
MAX_LINES = 16  # requests one socket may have running
HEARTBEAT_SECONDS = 20.0
RequestId = Annotated[str, Field(min_length=1, max_length=64)]


class TalkFrame(Talk):
    """A player's line to an NPC."""

    type: Literal["talk"]
    id: RequestId
    npc: str = Field(min_length=1, max_length=256)


class BarkFrame(Bark):
    """A game event an NPC says an ambient line about."""

    type: Literal["bark"]
    id: RequestId
    npc: str = Field(min_length=1, max_length=256)


class Ping(BaseModel):
    """A keep-alive from the client."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["ping"]


class Resume(BaseModel):
    """Take over the session of a dropped connection, from after ``after``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["resume"]
    session: str = Field(min_length=1, max_length=64)
    after: int = Field(ge=0)


Frame = TypeAdapter[TalkFrame | BarkFrame | Ping | Resume](
    Annotated[TalkFrame | BarkFrame | Ping | Resume, Field(discriminator="type")])


def install(plugin: Plugin, routes: Routes) -> None:
    """Register the socket's route on ``plugin``."""
    sessions = Sessions()

    async def serve(request: web.Request, caller: Caller) -> web.StreamResponse:
        if request.headers.get("Origin"):
            return web.json_response(
                {"error": "the NPC socket is for game engines, not web pages "
                          "(use POST /api/v1/npc/{npc}/talk/stream)", "code": "forbidden"},
                status=403)
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_SECONDS, max_msg_size=MAX_FRAME_BYTES)
        await ws.prepare(request)
        await _Socket(routes, caller, ws, sessions).run()
        return ws

    plugin.add_route("GET", PATH, serve)
    plugin.on_stop(sessions.close)


class _Socket:
    """One open socket: reads requests, runs each line as a task of its session."""

    def __init__(self, routes: Routes, caller: Caller, ws: web.WebSocketResponse,
                 sessions: Sessions) -> None:
        self.routes = routes
        self.caller = caller
        self.ws = ws
        self.sessions = sessions
        self.session: Session = sessions.open(ws, caller.tenant)
        self._fresh = True  # nothing asked yet: a resume may come

    async def run(self) -> None:
        """Serve until the socket closes; see :meth:`Session.detach` for its lines."""
        cards = self.routes.village.cards
        await self.session.send({"type": "ready", "session": self.session.id, "npcs": [
            {"id": npc, "name": card.name} for npc, card in cards.items()]}, numbered=False)
        try:
            async for frame in self.ws:
                if frame.type is WSMsgType.TEXT:
                    await self._request(frame.data)
                elif frame.type is WSMsgType.BINARY:
                    await self.error(None, "bad_frame", "frames must be JSON text")
                self._fresh = False
        finally:
            self.session.detach(self.ws)

    async def send(self, frame: dict[str, Any]) -> None:
        """Send one frame of the session (kept for a resume)."""
        await self.session.send(frame)

    async def error(self, request: str | None, code: str, text: str) -> None:
        """Tell the game a request (or a frame) was not answered, and why."""
        await self.send({"type": "error", **({"id": request} if request else {}),
                         "code": code, "error": text})

    async def _resume(self, frame: Resume) -> None:
        if not self._fresh:
            await self.error(None, "bad_request", "resume must be the first request")
            return
        old = self.sessions.find(frame.session, self.caller.tenant)
        if old is None or not await old.take_over(self.ws, frame.after):
            await self.error(None, "resume_lost", "that session cannot be resumed; lines "
                             "in progress on it are lost (ask again)")
            return
        self.session.end()  # the fresh one, never used
        self.session = old

    async def _request(self, data: str) -> None:
        try:
            frame = Frame.validate_json(data)
        except ValidationError as exc:
            await self.error(_id_of(data), "bad_request", problems(exc))
            return
        if isinstance(frame, Ping):
            await self.session.send({"type": "pong"}, numbered=False)
            return
        if isinstance(frame, Resume):
            await self._resume(frame)
            return
        lines = self.session.lines
        if frame.id in lines:
            await self.error(frame.id, "bad_request", "a request with this id is running")
            return
        if len(lines) >= MAX_LINES:
            await self.error(frame.id, "slow_down",
                             f"at most {MAX_LINES} requests may run on one socket")
            return
        if frame.npc not in self.routes.village.cards:
            await self.error(frame.id, "unknown_npc", f"no NPC {frame.npc!r}")
            return
        try:
            if isinstance(frame, TalkFrame):
                message = self.routes.message(self.caller, frame.npc, frame.player_id,
                                              frame.text, frame.game_state)
            else:
                message = self.routes.bark_message(self.caller, frame.npc, frame)
        except Refused as exc:
            await self.error(frame.id, exc.code, exc.reason)
            return
        task = asyncio.create_task(self._line(self.session, frame.id, frame.npc, message))
        lines[frame.id] = task
        task.add_done_callback(lambda _: lines.pop(frame.id, None))

    async def _line(self, session: Session, request: str, npc: str,
                    message: IncomingMessage) -> None:
        # Its frames go to the session, whichever socket holds it by then.
        try:
            async with aclosing(self.routes.line_events(self.caller, npc, message)) as events:
                async for kind, data in events:
                    await session.send({"type": kind, "id": request, **data})
        except Exception:
            log.exception("npc: a line of %s over the socket failed", npc)
            await session.send({"type": "error", "id": request, "code": "internal",
                                "error": "Sorry, something went wrong."})


def _id_of(data: str) -> str | None:
    """The ``id`` of a frame that is not valid, if it has a usable one."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        return None
    value = raw.get("id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None

"""The widget's WebSocket API, ``GET /api/v1/ws``.

The handshake carries the session token as a subprotocol (``bearer.<token>`` next to
``parley.v1``: browsers cannot set headers on a WebSocket, and a URL would put the token
in access logs) and is refused unless the token is valid and the page's ``Origin`` is
allowed. Frames are JSON text, at most ``max_frame_bytes`` (a bigger one closes the
socket with 1009); the heartbeat closes sockets whose peer stopped answering.

Client to server::

    {"type": "resume", "after": N}      once, first: N = last sequence number seen, 0 = none
    {"type": "message", "id": "...", "text": "..."}
    {"type": "feedback", "message_id": "...", "rating": "up"|"down", "comment": "..."}
    {"type": "ping"}

Server to client::

    {"type": "ready", "conversation_id", "expires_at"}
    {"type": "history", "turns": [{"role", "text", "message_id"}],
     "in_flight": [events of replies not finished], "last": N}
    {"type": "events", "events": [{"seq": N, "kind": "user|typing|delta|reset|final|notice|
     error", "message_id", "text", "action", "code"?}, ...]}   (what is ready, in order)
    {"type": "resumed", "last": N}           after the catch-up that follows resume
    {"type": "feedback_saved", "message_id"}   {"type": "pong"}
    {"type": "error", "code", "text", "id"?, "retry_after"?}
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from bots.web.hub import ChatHub
from bots.web.resume import Entry, StoreUnavailable, Subscription
from bots.web.sessions import Session, TokenRejected
from core import jsoncodec
from core.errors import MemoryUnavailable

log = logging.getLogger(__name__)

PROTOCOL = "parley.v1"
COALESCE_SECONDS = 0.01
TOKEN_PREFIX = "bearer."
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_RATE_TEXT = "You're sending messages too fast. Please wait a moment."
_UNAVAILABLE = "Sorry, I can't reach our conversation right now. Please try again shortly."
_ENDED = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED})


def token_from_protocols(request: web.Request) -> str:
    """The token a browser put in ``Sec-WebSocket-Protocol`` ("" if none)."""
    for value in request.headers.getall("Sec-WebSocket-Protocol", []):
        for item in value.split(","):
            item = item.strip()
            if item.startswith(TOKEN_PREFIX):
                return item[len(TOKEN_PREFIX):]
    return ""


async def handle_socket(request: web.Request, hub: ChatHub,
                        session: Session) -> web.WebSocketResponse:
    """Serve one accepted socket until it closes."""
    config = hub.config
    # compress=False: browsers offer permessage-deflate; for frames of a few hundred bytes
    # it would cost ~2-3 µs of CPU per frame each way and a few hundred KiB of zlib state
    # per open socket, to save bytes that hardly matter.
    ws = web.WebSocketResponse(protocols=(PROTOCOL,), heartbeat=config.heartbeat,
                               max_msg_size=config.max_frame_bytes, compress=False)
    ip = request.remote or "?"
    hub.sockets[ip] += 1  # counted before the handshake ends, so the cap holds under a burst
    try:
        await ws.prepare(request)
        await _Socket(hub, ws, session, ip).run()
    finally:
        hub.sockets[ip] -= 1
        if hub.sockets[ip] <= 0:
            del hub.sockets[ip]
    return ws


class _Socket:
    """One open socket: reads client frames, forwards the conversation's log."""

    def __init__(self, hub: ChatHub, ws: web.WebSocketResponse, session: Session,
                 ip: str) -> None:
        self.hub = hub
        self.ws = ws
        self.session = session
        self.ip = ip
        self.ref = hub.ref(session)
        self._rate_key = f"{session.user_id}\n{self.ref}"  # the session's in session_rate
        self.last = 0
        self._forwarder: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Read frames until the socket closes; the forwarder starts at ``resume``."""
        await self.send({"type": "ready", "conversation_id": self.session.conversation_id,
                         "expires_at": int(self.session.expires_at)})
        # Subscribed before anything is read, so nothing appended from here on is missed.
        with self.hub.log.subscribe(self.ref) as sub:
            # receive() itself: ``async for`` adds a coroutine and a check of its own.
            receive = self.ws.receive
            try:
                while True:
                    frame = await receive()
                    kind = frame.type
                    if kind is WSMsgType.TEXT:
                        await self._frame(frame.data, sub)
                    elif kind is WSMsgType.BINARY:
                        await self.error("bad_frame", "Frames must be JSON text.")
                    elif kind in _ENDED:
                        break
            finally:
                if self._forwarder is not None:
                    self._forwarder.cancel()
                    await asyncio.gather(self._forwarder, return_exceptions=True)

    async def send(self, frame: dict[str, Any]) -> None:
        """Send one frame, unless the socket is closing."""
        if not self.ws.closed:
            try:
                await self.ws.send_frame(jsoncodec.dumpb(frame), WSMsgType.TEXT)
            except ConnectionError:
                pass  # the peer went; the read loop ends on its own

    async def error(self, code: str, text: str, **extra: Any) -> None:
        """Tell the widget why something it sent was not done."""
        await self.send({"type": "error", "code": code, "text": text, **extra})

    async def _frame(self, data: str, sub: Subscription) -> None:
        try:
            frame = jsoncodec.loads(data)
        except (ValueError, RecursionError):
            frame = None
        if not isinstance(frame, dict):
            await self.error("bad_frame", "Frames must be JSON objects.")
            return
        if self.ip_limited():
            await self.error("rate_limited", _RATE_TEXT, id=_id(frame.get("id")),
                             retry_after=round(self.hub.ip_rate.window, 1))
            return
        kind = frame.get("type")
        try:
            if kind == "message":
                await self._message(frame)
            elif kind == "resume":
                await self._resume(frame, sub)
            elif kind == "feedback":
                await self._feedback(frame)
            elif kind == "ping":
                await self.send({"type": "pong"})
            else:
                await self.error("bad_frame", f"Unknown frame type {str(kind)[:40]!r}.")
        except (StoreUnavailable, MemoryUnavailable):
            await self.error("unavailable", _UNAVAILABLE, id=_id(frame.get("id")))

    def ip_limited(self) -> bool:
        """Whether this client address has sent more frames than its rate allows."""
        return self.hub.ip_rate.take(self.ip) > 0.0

    async def _message(self, frame: dict[str, Any]) -> None:
        client_id, text = frame.get("id"), frame.get("text")
        if not isinstance(client_id, str) or not _CLIENT_ID.match(client_id):
            await self.error("bad_frame", "A message needs an id of 1-64 letters, digits, - or _.")
            return
        if not isinstance(text, str):
            await self.error("bad_frame", "A message needs a text.", id=client_id)
            return
        conversation = frame.get("conversation_id", self.session.conversation_id)
        if conversation != self.session.conversation_id:
            await self.error("forbidden", "This session cannot write to that conversation.",
                             id=client_id)
            return
        wait = self.hub.session_rate.take(self._rate_key)
        if wait > 0.0:
            await self.error("rate_limited", _RATE_TEXT, id=client_id, retry_after=round(wait, 1))
            return
        self.hub.submit(self.session, client_id, text, self.ref)

    async def _resume(self, frame: dict[str, Any], sub: Subscription) -> None:
        after = frame.get("after", 0)
        if self._forwarder is not None:
            await self.error("bad_frame", "resume is sent once per socket.")
            return
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            await self.error("bad_frame", "resume needs after: a sequence number >= 0.")
            return
        if frame.get("conversation_id", self.session.conversation_id) != (
            self.session.conversation_id
        ):
            await self.error("forbidden", "This session cannot read that conversation.")
            return
        try:
            await self._catch_up(after, fresh=after == 0)
        except (StoreUnavailable, MemoryUnavailable):
            # Without its catch-up the socket is no use: the widget reconnects and
            # resumes again after a pause.
            await self.error("unavailable", _UNAVAILABLE)
            await self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"try again later")
            return
        # The widget now knows what the server has, and sends what it still holds.
        await self.send({"type": "resumed", "last": self.last})
        self._forwarder = asyncio.create_task(self._forward(sub))

    async def _catch_up(self, after: int, *, fresh: bool = False) -> None:
        """Send what the widget lacks after ``after``: the entries, or (``fresh``: a page
        load, or when some are no longer kept) the whole conversation again."""
        if not fresh:
            backlog = await self.hub.log.since(self.ref, after)
            if not backlog.gap:
                await self._events(backlog.entries)
                self.last = max(self.last, backlog.last)
                return
        snapshot = await self.hub.snapshot(self.session)
        turns = [{k: v for k, v in t.items() if k != "prompt"} for t in snapshot.turns]
        await self.send({"type": "history", "turns": turns, "in_flight": snapshot.in_flight,
                         "last": snapshot.last})
        self.last = snapshot.last

    async def _events(self, entries: list[Entry]) -> None:
        if entries:
            await self.send({"type": "events", "events": entries})

    async def _forward(self, sub: Subscription) -> None:
        """Forward what is appended; fill any hole (another front end's entries, pokes)
        from the log, so the widget gets every number once, in order."""
        try:
            await self._forward_all(sub)
        except Exception:
            # The widget reconnects and resumes from what it has: nothing is lost.
            log.exception("web: forwarding %s failed", self.ref)
            await self.ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")

    async def _forward_all(self, sub: Subscription) -> None:
        while True:
            ready = await sub.batch()
            if ready[0] is None:
                # Another front end appended: a moment's wait lets a few of its appends
                # be read back together. (This process's events come already batched by
                # its ReplyWriter, one append per few deltas: they go out at once.)
                await asyncio.sleep(COALESCE_SECONDS)
                ready += sub.ready()
            out: list[Entry] = []
            hole = False
            for entry in ready:
                if entry is None:
                    hole = True
                elif "seq" not in entry:
                    out.append(entry)  # the log itself failed: not numbered
                elif entry["seq"] == self.last + 1 and not hole:
                    out.append(entry)
                    self.last = entry["seq"]
                elif entry["seq"] > self.last:
                    hole = True
            await self._events(out)  # what arrived together goes in one frame
            if hole:
                try:
                    await self._catch_up(self.last)
                except (StoreUnavailable, MemoryUnavailable):
                    await self.error("unavailable", _UNAVAILABLE)

    async def _feedback(self, frame: dict[str, Any]) -> None:
        message_id, rating = frame.get("message_id"), frame.get("rating")
        comment = frame.get("comment", "")
        if (not isinstance(message_id, str) or not _CLIENT_ID.match(message_id)
                or rating not in ("up", "down") or not isinstance(comment, str)):
            await self.error("bad_frame", "Feedback needs message_id, rating up|down and an "
                             "optional comment.")
            return
        wait = self.hub.session_rate.take(self._rate_key)
        if wait > 0.0:
            await self.error("rate_limited", _RATE_TEXT, retry_after=round(wait, 1))
            return
        if await self.hub.rate(self.session, message_id, rating, comment):
            await self.send({"type": "feedback_saved", "message_id": message_id})
        else:
            await self.error("unknown_message", "There is no reply to rate with that id.")


def _id(value: Any) -> str | None:
    return value if isinstance(value, str) and _CLIENT_ID.match(value) else None


def refusal(exc: TokenRejected) -> web.Response:
    """The handshake's answer to a bad token."""
    return web.json_response({"error": exc.reason, "code": exc.code}, status=401)

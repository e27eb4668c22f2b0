"""NPC socket sessions: lines that outlive a dropped connection, replayed on resume.

Each socket starts a session (its id in the ``ready`` frame). Every frame of its lines
carries ``seq``, numbered per session, and the last :data:`REPLAY_FRAMES` are kept.
When the connection drops (no close handshake: a network blip, a game that crashed) the
session's lines go on for :data:`RESUME_SECONDS`; a new socket of the same API key that
sends ``{"type": "resume", "session", "after": N}`` first takes the session over: the
frames after N, then ``resumed``, then the lines' frames as they come. Nothing is sent
twice and nothing is skipped; when that cannot be promised (the session ended, or frames
after N are no longer kept), the resume is refused and the socket keeps its own session.
A socket closed with a close frame ends its session and its lines at once.

Sessions live in the process that serves the socket: a game reconnecting to another
front end gets ``resume_lost``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import deque
from typing import Any

from aiohttp import WSCloseCode, web

REPLAY_FRAMES = 2048
RESUME_SECONDS = 60.0


class Session:
    """One game connection's lines and the frames they sent, numbered."""

    def __init__(self, sessions: Sessions, tenant: str | None) -> None:
        self.id = secrets.token_urlsafe(16)
        self.tenant = tenant
        self.lines: dict[str, asyncio.Task[None]] = {}
        self.ws: web.WebSocketResponse | None = None
        self._sessions = sessions
        self._seq = 0
        self._sent: deque[tuple[int, str]] = deque(maxlen=REPLAY_FRAMES)
        self._sending = asyncio.Lock()  # one frame at a time; a replay is one
        self._expiry: asyncio.TimerHandle | None = None

    async def send(self, frame: dict[str, Any], *, numbered: bool = True) -> None:
        """Send ``frame`` to the session's socket, if any; numbered ones are kept."""
        async with self._sending:
            if numbered:
                self._seq += 1
                frame = {**frame, "seq": self._seq}
            text = json.dumps(frame, ensure_ascii=False)
            if numbered:
                self._sent.append((self._seq, text))
            if self.ws is not None:
                await _write(self.ws, text)

    async def take_over(self, ws: web.WebSocketResponse, after: int) -> bool:
        """Move the session to ``ws`` and send it what came after ``after`` (False: the
        frames after it are not all kept, or it is not a number this session sent)."""
        async with self._sending:
            oldest = self._sent[0][0] if self._sent else self._seq + 1
            if not 0 <= after <= self._seq or after + 1 < oldest:
                return False
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
            old, self.ws = self.ws, ws
            for seq, text in self._sent:
                if seq > after:
                    await _write(ws, text)
            await _write(ws, json.dumps(
                {"type": "resumed", "session": self.id, "last": self._seq}))
        if old is not None and old is not ws:
            await old.close(code=WSCloseCode.POLICY_VIOLATION, message=b"resumed elsewhere")
        return True

    def detach(self, ws: web.WebSocketResponse) -> None:
        """``ws`` closed: end the session if it was closed on purpose, else keep it for
        :data:`RESUME_SECONDS`. Nothing if another socket took the session over."""
        if self.ws is not ws:
            return
        self.ws = None
        if ws.close_code not in (None, WSCloseCode.ABNORMAL_CLOSURE):
            self.end()
            return
        self._expiry = asyncio.get_running_loop().call_later(RESUME_SECONDS, self.end)

    def end(self) -> None:
        """Cancel the session's lines and forget it."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._sessions.forget(self)
        for task in self.lines.values():
            task.cancel()


class Sessions:
    """The open and resumable sessions of one bot's NPC socket."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def open(self, ws: web.WebSocketResponse, tenant: str | None) -> Session:
        """A new session on ``ws``."""
        session = Session(self, tenant)
        session.ws = ws
        self._by_id[session.id] = session
        return session

    def find(self, session_id: str, tenant: str | None) -> Session | None:
        """The session ``session_id`` if a caller of ``tenant`` may resume it."""
        session = self._by_id.get(session_id)
        return session if session is not None and session.tenant == tenant else None

    def forget(self, session: Session) -> None:
        """Drop ``session`` (it ended)."""
        if self._by_id.get(session.id) is session:
            del self._by_id[session.id]

    async def close(self) -> None:
        """End every session and wait for their lines (the bot stops)."""
        tasks = [t for s in self._by_id.values() for t in s.lines.values()]
        for session in list(self._by_id.values()):
            session.end()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _write(ws: web.WebSocketResponse, text: str) -> None:
    if ws.closed:
        return
    try:
        await ws.send_str(text)
    except ConnectionError:
        pass  # the peer went; the read loop ends on its own

"""The widget's server side, apart from HTTP: sessions, replies that outlive sockets,
history, feedback and rate limits.

A message from a widget starts a reply task that runs the engine and appends its
events to the conversation's reply log (:mod:`bots.web.resume`); sockets only read the
log. So a reload, a network blip or a socket reaped by the heartbeat loses nothing:
the reply goes on, and the widget reads on from the last number it saw.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bots.web.feedback import FeedbackStore, Rating, new_feedback
from bots.web.limits import RateLimiter
from bots.web.resume import TERMINAL, Entry, ReplyLog, StoreUnavailable
from bots.web.sessions import Session, SessionSigner
from bots.web.settings import WidgetFields
from bots.web.stores import CHANNEL, WidgetStores, ref_of
from bots.web.writer import ReplyWriter, Ticks
from core.engine import Engine
from core.lifecycle import ServiceBase
from core.plugin_services import DeliveryError
from core.streams import closing
from core.types import ConversationKey, IncomingMessage, ReplyEvent, ReplyKind, Turn

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0  # seconds replies in progress get to finish when the hub stops


# A kind's text by dict lookup: an enum member's ``.value`` is a descriptor call (~0.25 µs,
# three times a reply).
_KINDS = {kind: kind.value for kind in ReplyKind}


def event_entry(event: ReplyEvent, message_id: str) -> Entry:
    """A reply event as the log keeps it (without its number)."""
    entry: Entry = {"kind": _KINDS[event.kind], "message_id": message_id, "text": event.text,
                    "action": str(event.action)}
    if event.code is not None:
        entry["code"] = event.code
    return entry


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a widget opening a conversation gets: stored turns, then the entries of
    replies still in flight; live entries follow from ``last``."""

    turns: list[dict[str, Any]]
    in_flight: list[Entry]
    last: int


class ChatHub(ServiceBase):
    """Sessions, reply tasks, resume log and feedback of one bot's web widget."""

    def __init__(self, engine: Engine, config: WidgetFields) -> None:
        self.engine = engine
        self.config = config
        settings = engine.settings
        secret = config.secret
        if secret is None:
            log.warning("bot %s: adapters.web.secret is not set: session tokens die with this "
                        "process and do not work across front ends", engine.name)
            secret = secrets.token_urlsafe(32)
        self.signer = SessionSigner(engine.name, secret, ttl=config.session_ttl,
                                    identity_secret=config.identity_secret)
        self.stores = WidgetStores(settings, config, engine.redis)
        self.log: ReplyLog = self.stores.log
        self.feedback: FeedbackStore = self.stores.feedback
        # A forget hook (core.forget): the reply logs and feedback of a user forgotten.
        self.forget_user = self.stores.forget_user
        self.session_rate = RateLimiter(config.session_rate, config.rate_window)
        self.ip_rate = RateLimiter(config.ip_rate, config.rate_window)
        self.sockets: Counter[str] = Counter()  # open sockets per client address
        self._tasks: set[asyncio.Task[None]] = set()
        self._ticks = Ticks()  # when the reply writers' batches go out

    async def _start(self) -> None:
        await self.stores.start()

    async def _stop(self) -> None:
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.stores.stop()

    @staticmethod
    def ref(session: Session) -> str:
        """The conversation's reference in keys, as memory spells it."""
        return ref_of(session.conversation_id)

    def key(self, session: Session) -> ConversationKey:
        """The engine's key of the session's conversation."""
        return ConversationKey(self.engine.name, CHANNEL, session.conversation_id)

    def submit(self, session: Session, message_id: str, text: str, ref: str) -> None:
        """Start the reply to the user's message (logged with the reply's first event);
        ``ref``: the session's :meth:`ref` (its socket keeps it).

        The reply runs on its own task, whatever becomes of the socket that sent it.
        """
        message = IncomingMessage(
            bot=self.engine.name, channel=CHANNEL, conversation_id=session.conversation_id,
            user_id=session.user_id, message_id=message_id, text=text,
        )
        task = asyncio.create_task(self._reply(ref, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, ref: str, message: IncomingMessage) -> None:
        mid = message.message_id
        writer = ReplyWriter(self.log, ref, ticks=self._ticks)
        # "at": where a message the bot stores nothing of (relayed to people while the
        # bot is paused) goes among the stored turns in a snapshot.
        user: Entry | None = {"kind": "user", "message_id": mid, "text": message.text,
                              "at": message.received_at}
        try:
            async with closing(self.engine.handle(message)) as events:
                async for event in events:
                    if user is not None:
                        # Logged with the first event: one append fewer per message (the
                        # widget showed its own message at once anyway).
                        writer.write(user)
                        user = None
                    writer.write(event_entry(event, mid))
            await writer.drain()
        except StoreUnavailable as exc:
            # The reply cannot be kept, so it stops here (leaving the block cancels the
            # generation); the sockets open on the conversation are told directly.
            self._failed(ref, mid, "web_store", f"reply log failed: {exc}")
        except Exception:
            log.exception("web: reply to %s/%s failed", ref, mid)
            try:
                await writer.drain()  # the apology comes after what was shown
                failed = {"kind": "error", "message_id": mid,
                          "text": self.engine.apologies.internal, "action": "allow",
                          "code": "internal"}
                await self.log.append(ref, [user, failed] if user is not None else [failed])
            except StoreUnavailable as exc:
                self._failed(ref, mid, "web_store", f"reply log failed: {exc}")
            else:
                self.engine.metrics.errors.labels(self.engine.name, "web_reply").inc()

    def _failed(self, ref: str, message_id: str, stage: str, reason: str) -> None:
        log.warning("web: %s/%s: %s", ref, message_id, reason)
        self.engine.metrics.errors.labels(self.engine.name, stage).inc()
        self.log.tell(ref, {"kind": "error", "message_id": message_id,
                            "text": self.engine.apologies.internal, "action": "allow",
                            "code": "unavailable"})

    async def deliver(self, key: ConversationKey, text: str) -> None:
        """A plugin's own message into a web conversation (the outbox's sender).

        It goes into the conversation's reply log like a reply's events: sockets open on
        the conversation (on any front end) show it at once, and a widget that comes
        back within ``resume_ttl`` finds it in its history. HTTP API callers read it with
        ``GET /api/v1/chat/messages``.
        """
        entry: Entry = {"kind": "message", "message_id": "out-" + secrets.token_hex(8),
                        "text": text, "action": "allow", "at": time.time()}
        try:
            await self.log.append(ref_of(key.conversation_id), [entry])
        except StoreUnavailable as exc:
            raise DeliveryError(f"web: the message could not be kept: {exc}") from exc

    async def snapshot(self, session: Session) -> Snapshot:
        """The conversation for a widget that has nothing yet (a page load).

        The log is read before memory: a reply that finishes in between is then in both,
        and the widget, which keys bubbles by message id, shows it once. What memory
        does not hold but the widget showed (plugins' messages, messages relayed to
        people while the bot was paused) comes from the log, in time order.
        """
        backlog = await self.log.since(self.ref(session), 0)
        memory = await self.engine.memory.load(self.key(session), session.user_id)
        done = {e["message_id"] for e in backlog.entries if e["kind"] in TERMINAL}
        in_flight = [e for e in backlog.entries if e["message_id"] not in done]
        stored = {t.message_id for t in memory.turns if t.role == "user"}
        return Snapshot(_merged(_history(memory.turns), memory.turns,
                                _unstored(backlog.entries, stored)),
                        in_flight, backlog.last)

    async def rate(self, session: Session, message_id: str, rating: Rating,
                   comment: str) -> bool:
        """Store feedback on the reply to ``message_id``; False if there is no such reply."""
        memory = await self.engine.memory.load(self.key(session), session.user_id)
        for turn in _history(memory.turns):
            if turn["role"] == "assistant" and turn["message_id"] == message_id:
                record = new_feedback(message_id, rating, comment, turn["prompt"], turn["text"],
                                      session.user_id)
                await self.feedback.put(self.ref(session), record)
                return True
        return False


def _unstored(entries: list[Entry], stored: set[str | None]) -> list[tuple[float, dict[str, Any]]]:
    """What the widget showed that memory does not keep, as history turns with their
    times: plugins' messages, and messages answered without a stored turn (commands,
    refusals, failures, silence while a colleague has the conversation)."""
    ends = {e["message_id"]: e for e in entries if e["kind"] in TERMINAL}
    shown: list[tuple[float, dict[str, Any]]] = []
    for e in entries:
        mid = e["message_id"]
        if e["kind"] == "message":
            shown.append((e.get("at", 0.0), {"role": "assistant", "kind": "message",
                                             "text": e["text"], "message_id": mid}))
        elif e["kind"] == "user" and mid in ends and mid not in stored:
            at = e.get("at", 0.0)
            shown.append((at, {"role": "user", "text": e["text"], "message_id": mid}))
            end = ends[mid]
            if end.get("code") not in ("silent", "duplicate"):
                shown.append((at, {"role": "assistant", "kind": end["kind"],
                                   "text": end["text"], "message_id": mid}))
    return shown


def _merged(history: list[dict[str, Any]], turns: tuple[Turn, ...],
            extra: list[tuple[float, dict[str, Any]]]) -> list[dict[str, Any]]:
    """``history`` (made from ``turns``) with ``extra`` placed among it by time."""
    if not extra:
        return history
    # Each history item's time: its user turn's (an answer goes right after it).
    times = iter([t.at for t in turns if t.role == "user"])
    timed: list[tuple[float, dict[str, Any]]] = []
    at = 0.0
    for item in history:
        if item["role"] == "user":
            at = next(times, at)
        timed.append((at, item))
    return [item for _, item in sorted(timed + extra, key=lambda pair: pair[0])]


def _history(turns: tuple[Turn, ...]) -> list[dict[str, Any]]:
    """Stored turns for the widget: each reply carries the id (and text) of the user
    message it answered, which is how the widget and feedback name it."""
    shown: list[dict[str, Any]] = []
    last_user: Turn | None = None
    for turn in turns:
        if turn.role == "user":
            last_user = turn
            shown.append({"role": "user", "text": turn.text, "message_id": turn.message_id})
        elif turn.role == "assistant" and last_user is not None:
            shown.append({"role": "assistant", "text": turn.text,
                          "message_id": last_user.message_id, "prompt": last_user.text})
            last_user = None
    return shown

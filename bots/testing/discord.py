"""A fake Discord (REST API and gateway) on 127.0.0.1, for testing bots with the real discord.py.

The test drives the fake's world (guilds, channels, threads, DMs, users) and its events
(messages, slash commands, reconnects), and reads back what the bot sent::

    async with FakeDiscord() as discord:
        guild = discord.add_guild("club")
        channel = discord.add_channel(guild, "general")
        alice = discord.add_user("alice")
        ...  # start the bot with api_base_url=discord.api_base_url,
             #                    gateway_url=discord.gateway_url, token=discord.token
        discord.post(channel, alice, f"<@{discord.bot_id}> hello")
        sent = await discord.wait_for_messages(channel, 1)

The gateway speaks HELLO, IDENTIFY -> READY (+ GUILD_CREATE), RESUME -> missed events
+ RESUMED, heartbeats, op 7 RECONNECT and op 9 INVALID SESSION. Events dispatched while
the bot is away are replayed when it resumes, as Discord does. REST answers with
``Content-Type: application/json`` exactly and marks 429s with a ``Via`` header, as
discord.py expects of the real thing (without ``Via`` it takes a 429 for a Cloudflare ban).
Message content over 2,000 characters is refused with a 400, as Discord does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

from aiohttp import WSMsgType, web

MAX_CONTENT = 2000
_MENTION = re.compile(r"<@!?(\d+)>")
_EVERYONE = re.compile(r"@(everyone|here)\b")
_ROLE = re.compile(r"<@&(\d+)>")

Json = dict[str, Any]


@dataclass
class Request:
    """One REST call the bot made, as the fake saw it."""

    method: str
    path: str
    body: Any
    at: float
    status: int = 0


@dataclass
class Message:
    """A message on the fake, with every version of its content (the first is the post)."""

    id: int
    channel_id: int
    author_id: int
    content: str
    payload: Json  # the body of the request that created it ({} for user messages)
    versions: list[tuple[float, str, Json]] = field(default_factory=list)

    @property
    def edits(self) -> list[tuple[float, str, Json]]:
        """``(monotonic time, content, request body)`` of each edit, in order."""
        return self.versions[1:]


@dataclass(frozen=True)
class _Fault:
    """An injected error: a 429 (with Discord's headers) or another status."""

    path: str
    status: int
    retry_after: float = 0.0
    is_global: bool = False

    def response(self) -> web.Response:
        if self.status != 429:
            return _json({"message": f"injected {self.status}", "code": 50013}, self.status)
        response = _json({"message": "You are being rate limited.",
                          "retry_after": self.retry_after, "global": self.is_global}, 429)
        response.headers.update({
            # Without Via, discord.py takes a 429 for a Cloudflare ban and gives up.
            "Via": "1.1 google", "Retry-After": str(self.retry_after),
            "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset-After": str(self.retry_after),
            "X-RateLimit-Bucket": "fake-bucket",
            "X-RateLimit-Scope": "global" if self.is_global else "shared",
        })
        return response


@dataclass
class _Session:
    id: str
    events: list[Json] = field(default_factory=list)  # every dispatch, seq = index + 1
    invalid: bool = False


class FakeDiscord:
    """The far end of discord.py's wire; see the module docstring."""

    def __init__(self, *, token: str = "fake-bot-token", heartbeat_interval: float = 30.0) -> None:
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self._ids = itertools.count(1_100_000_000_000_000_000)
        self.bot_id = self._id()
        self.application_id = self._id()
        self.users: dict[int, Json] = {}
        self.bot = self._user_payload(self.bot_id, "parley", bot=True)
        self.guilds: dict[int, Json] = {}
        self.channels: dict[int, Json] = {}
        self.messages: dict[int, Message] = {}
        self.requests: list[Request] = []
        self.commands: list[Json] = []
        self.identified = 0  # IDENTIFYs accepted
        self.resumed = 0  # RESUMEs accepted
        self.replayed = 0  # events sent again on a resume although the bot had them
        self._interactions: dict[str, Json] = {}  # token -> interaction
        self._session: _Session | None = None
        self._outbox: asyncio.Queue[str] | None = None  # the live connection's
        self.connections = 0  # gateway connections opened
        self._live = asyncio.Event()  # a socket is identified or resumed
        self._changed = asyncio.Condition()
        self._faults: list[_Fault] = []
        self._nonces: dict[tuple[int, str], int] = {}  # (channel, nonce) -> message id
        self._redeliver = 0
        self._runner: web.AppRunner | None = None
        self._port = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on 127.0.0.1, on a free port."""
        app = web.Application(middlewares=[self._rest_middleware])
        app.router.add_get("/gateway", self._gateway)
        self._add_routes(app.router)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Close the gateway and stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def api_base_url(self) -> str:
        """What to configure as the adapter's ``api_base_url``."""
        return f"http://127.0.0.1:{self._port}/api/v10"

    @property
    def gateway_url(self) -> str:
        """What to configure as the adapter's ``gateway_url``."""
        return f"ws://127.0.0.1:{self._port}/gateway"

    # -- the world ---------------------------------------------------------------------

    def _id(self) -> int:
        return next(self._ids)

    def _user_payload(self, user_id: int, name: str, *, bot: bool = False) -> Json:
        user = {"id": str(user_id), "username": name, "discriminator": "0", "avatar": None,
                "global_name": name, "bot": bot}
        self.users[user_id] = user
        return user

    def add_user(self, name: str, *, bot: bool = False) -> int:
        """A new user (or, with ``bot``, another bot); returns its id."""
        user_id = self._id()
        self._user_payload(user_id, name, bot=bot)
        return user_id

    def add_guild(self, name: str) -> int:
        """A guild the bot is a member of (announced in GUILD_CREATE); returns its id."""
        guild_id = self._id()
        everyone = {"id": str(guild_id), "name": "@everyone", "permissions": "1071698660929",
                    "position": 0, "color": 0, "hoist": False, "managed": False,
                    "mentionable": False, "flags": 0}
        self.guilds[guild_id] = {
            "id": str(guild_id), "name": name, "owner_id": str(self.bot_id), "roles": [everyone],
            "emojis": [], "stickers": [], "features": [], "member_count": 1, "large": False,
            "unavailable": False, "channels": [], "threads": [], "stage_instances": [],
            "guild_scheduled_events": [], "soundboard_sounds": [], "voice_states": [],
            "presences": [], "members": [self._member(self.bot_id)],
        }
        return guild_id

    def add_channel(self, guild_id: int, name: str) -> int:
        """A text channel of ``guild_id``; returns its id."""
        channel_id = self._id()
        channel = {"id": str(channel_id), "type": 0, "guild_id": str(guild_id), "name": name,
                   "position": len(self.guilds[guild_id]["channels"]),
                   "permission_overwrites": [], "nsfw": False, "topic": None,
                   "last_message_id": None, "rate_limit_per_user": 0, "parent_id": None}
        self.channels[channel_id] = channel
        self.guilds[guild_id]["channels"].append(channel)
        return channel_id

    def add_thread(self, parent_id: int, name: str) -> int:
        """A public thread under channel ``parent_id``; returns its id."""
        parent = self.channels[parent_id]
        thread_id = self._id()
        thread = {"id": str(thread_id), "type": 11, "guild_id": parent["guild_id"],
                  "parent_id": str(parent_id), "name": name, "owner_id": str(self.bot_id),
                  "last_message_id": None, "rate_limit_per_user": 0, "message_count": 0,
                  "member_count": 1, "flags": 0,
                  "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                      "archive_timestamp": _now(), "locked": False}}
        self.channels[thread_id] = thread
        self.guilds[int(parent["guild_id"])]["threads"].append(thread)
        return thread_id

    def open_dm(self, user_id: int) -> int:
        """The DM channel between the bot and ``user_id``; returns its id."""
        channel_id = self._id()
        self.channels[channel_id] = {"id": str(channel_id), "type": 1, "last_message_id": None,
                                     "recipients": [self.users[user_id]]}
        return channel_id

    def _member(self, user_id: int) -> Json:
        return {"user": self.users[user_id], "roles": [], "joined_at": _now(), "deaf": False,
                "mute": False, "flags": 0}

    # -- what users do -----------------------------------------------------------------

    def post(
        self, channel_id: int, author_id: int, content: str, *, reply_to: int | None = None
    ) -> int:
        """``author_id`` posts ``content`` in ``channel_id`` (MESSAGE_CREATE); returns its id.

        ``<@id>`` in ``content`` mentions that user, as in Discord's wire format.
        """
        message = self._store(channel_id, author_id, content, {}, reply_to=reply_to)
        self.dispatch("MESSAGE_CREATE", self._message_payload(message))
        return message.id

    def run_command(
        self, channel_id: int, user_id: int, name: str, options: Mapping[str, str] | None = None
    ) -> str:
        """``user_id`` runs the slash command ``/name`` (INTERACTION_CREATE); returns its token."""
        command = next((c for c in self.commands if c["name"] == name), None)
        if command is None:
            raise LookupError(f"no command /{name} was synced (have {self.command_names()})")
        channel = self.channels[channel_id]
        token = f"interaction-{self._id()}"
        interaction: Json = {
            "id": str(self._id()), "application_id": str(self.application_id), "type": 2,
            "token": token, "version": 1, "channel_id": str(channel_id), "channel": channel,
            "locale": "en-US", "app_permissions": "0", "attachment_size_limit": 8_388_608,
            "entitlements": [], "authorizing_integration_owners": {},
            "data": {"id": command["id"], "name": name, "type": 1,
                     "options": [{"name": k, "type": 3, "value": v}
                                 for k, v in (options or {}).items()]},
        }
        if "guild_id" in channel:
            interaction["guild_id"] = channel["guild_id"]
            interaction["member"] = {**self._member(user_id), "permissions": "0"}
        else:
            interaction["user"] = self.users[user_id]
        self._interactions[token] = {"interaction": interaction, "channel_id": channel_id,
                                     "messages": []}
        self.dispatch("INTERACTION_CREATE", interaction)
        return token

    def command_names(self) -> list[str]:
        """The names of the synced slash commands."""
        return sorted(c["name"] for c in self.commands)

    # -- the gateway, driven by the test -----------------------------------------------

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

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
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
        self._session = _Session(id=f"session-{self._id()}")
        self._outbox = outbox
        self.dispatch("READY", {
            "v": 10, "user": self.bot, "session_id": self._session.id,
            "resume_gateway_url": self.gateway_url, "shard": [0, 1],
            "guilds": [{"id": g["id"], "unavailable": True} for g in self.guilds.values()],
            "application": {"id": str(self.application_id), "flags": 0},
        })
        for guild in self.guilds.values():
            self.dispatch("GUILD_CREATE", guild)
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

    # -- REST --------------------------------------------------------------------------

    def rate_limit(
        self, count: int, *, path: str = "/messages", retry_after: float = 0.05,
        is_global: bool = False,
    ) -> None:
        """Answer the next ``count`` requests whose path contains ``path`` with a 429."""
        self._faults += [_Fault(path, 429, retry_after, is_global)] * count

    def fail(self, count: int, *, path: str, status: int = 403) -> None:
        """Answer the next ``count`` requests whose path contains ``path`` with ``status``."""
        self._faults += [_Fault(path, status)] * count

    @property
    def faults_left(self) -> int:
        """Injected 429s and failures not yet served."""
        return len(self._faults)

    @web.middleware
    async def _rest_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if request.path == "/gateway":
            return await handler(request)  # type: ignore[no-any-return]
        body = await request.json() if request.can_read_body else None
        record = Request(request.method, request.path, body, time.monotonic())
        self.requests.append(record)
        # Interaction responses are authorised by the token in their path, not the bot's.
        by_token = request.path.startswith(("/api/v10/interactions/", "/api/v10/webhooks/"))
        if not by_token and request.headers.get("Authorization") != f"Bot {self.token}":
            response = _json({"message": "401: Unauthorized", "code": 0}, 401)
        elif (fault := self._take_fault(request.path)) is not None:
            response = fault.response()
        else:
            response = await handler(request)
        record.status = response.status
        async with self._changed:
            self._changed.notify_all()
        return response

    def _take_fault(self, path: str) -> _Fault | None:
        for i, fault in enumerate(self._faults):
            if fault.path in path:
                del self._faults[i]
                return fault
        return None

    def _add_routes(self, router: web.UrlDispatcher) -> None:
        api = "/api/v10"
        router.add_get(f"{api}/users/@me", self._me)
        router.add_get(f"{api}/oauth2/applications/@me", self._application)
        router.add_get(f"{api}/gateway", self._gateway_info)
        router.add_get(f"{api}/gateway/bot", self._gateway_info)
        router.add_put(f"{api}/applications/{{app}}/commands", self._sync_commands)
        router.add_post(f"{api}/channels/{{channel}}/messages", self._create_message)
        router.add_patch(f"{api}/channels/{{channel}}/messages/{{message}}", self._edit_message)
        router.add_delete(f"{api}/channels/{{channel}}/messages/{{message}}", self._delete)
        router.add_post(f"{api}/channels/{{channel}}/typing", self._typing)
        router.add_post(f"{api}/interactions/{{id}}/{{token}}/callback", self._callback)
        router.add_patch(f"{api}/webhooks/{{app}}/{{token}}/messages/@original",
                         self._edit_original)
        router.add_post(f"{api}/webhooks/{{app}}/{{token}}", self._followup)

    async def _me(self, request: web.Request) -> web.Response:
        return _ok(self.bot)

    async def _gateway_info(self, request: web.Request) -> web.Response:
        return _ok({"url": self.gateway_url, "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}})

    async def _typing(self, request: web.Request) -> web.Response:
        return _no_content()

    async def _application(self, request: web.Request) -> web.Response:
        return _ok({"id": str(self.application_id), "name": "parley", "description": "",
                    "icon": None, "bot_public": True, "bot_require_code_grant": False,
                    "owner": self.users[self.bot_id], "verify_key": "0" * 64, "flags": 0,
                    "summary": "", "team": None})

    async def _sync_commands(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.commands = [{"id": str(self._id()), "application_id": str(self.application_id),
                          "version": "1", "type": 1, "options": [], "default_member_permissions":
                          None, "dm_permission": True, "nsfw": False, **command}
                         for command in body]
        return _ok(self.commands)

    async def _create_message(self, request: web.Request) -> web.Response:
        channel_id = int(request.match_info["channel"])
        if channel_id not in self.channels:
            return _json({"message": "Unknown Channel", "code": 10003}, 404)
        body = await request.json()
        problem = _check_content(body)
        if problem:
            return _json({"message": problem, "code": 50035}, 400)
        nonce = body.get("nonce")
        if body.get("enforce_nonce") and (channel_id, nonce) in self._nonces:
            # Discord creates a message once per nonce (within a few minutes).
            existing = self.messages.get(self._nonces[channel_id, nonce])
            if existing is not None:
                return _ok(self._message_payload(existing))
        reference = (body.get("message_reference") or {}).get("message_id")
        message = self._store(channel_id, self.bot_id, body.get("content") or "", body,
                              reply_to=int(reference) if reference else None)
        if body.get("enforce_nonce") and nonce:
            self._nonces[channel_id, nonce] = message.id
        return _ok(self._message_payload(message))

    async def _edit_message(self, request: web.Request) -> web.Response:
        message = self.messages.get(int(request.match_info["message"]))
        if message is None:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        body = await request.json()
        problem = _check_content(body)
        if problem:
            return _json({"message": problem, "code": 50035}, 400)
        if "content" in body:
            message.content = body["content"] or ""
        message.versions.append((time.monotonic(), message.content, body))
        return _ok(self._message_payload(message))

    async def _delete(self, request: web.Request) -> web.Response:
        self.messages.pop(int(request.match_info["message"]), None)
        return _no_content()

    async def _callback(self, request: web.Request) -> web.Response:
        entry = self._interactions.get(request.match_info["token"])
        if entry is None:
            return _json({"message": "Unknown interaction", "code": 10062}, 404)
        body = await request.json()
        kind = body.get("type")
        resource: Json = {"type": kind}
        if kind in (4, 5):  # a message now, or "thinking..." to be edited later
            data = body.get("data") or {}
            message = self._store(entry["channel_id"], self.bot_id, data.get("content") or "",
                                  data)
            entry["messages"].append(message)
            resource["message"] = self._message_payload(message)
        interaction = entry["interaction"]
        return _ok({"interaction": {"id": interaction["id"], "type": 2,
                                    "response_message_loading": kind == 5,
                                    "response_message_ephemeral": False},
                    "resource": resource})

    async def _edit_original(self, request: web.Request) -> web.Response:
        entry = self._interactions.get(request.match_info["token"])
        if entry is None or not entry["messages"]:
            return _json({"message": "Unknown Webhook", "code": 10015}, 404)
        request.match_info["message"] = str(entry["messages"][0].id)
        return await self._edit_message(request)

    async def _followup(self, request: web.Request) -> web.Response:
        entry = self._interactions.get(request.match_info["token"])
        if entry is None:
            return _json({"message": "Unknown Webhook", "code": 10015}, 404)
        body = await request.json()
        problem = _check_content(body)
        if problem:
            return _json({"message": problem, "code": 50035}, 400)
        message = self._store(entry["channel_id"], self.bot_id, body.get("content") or "", body)
        entry["messages"].append(message)
        return _ok(self._message_payload(message))

    # -- messages ----------------------------------------------------------------------

    def _store(
        self, channel_id: int, author_id: int, content: str, payload: Json,
        *, reply_to: int | None = None,
    ) -> Message:
        message = Message(self._id(), channel_id, author_id, content, payload)
        message.versions.append((time.monotonic(), content, payload))
        if reply_to is not None:
            message.payload = {**payload, "_reply_to": reply_to}
        self.messages[message.id] = message
        return message

    def _message_payload(self, message: Message) -> Json:
        channel = self.channels[message.channel_id]
        mentions = [self.users[int(i)] for i in _MENTION.findall(message.content)
                    if int(i) in self.users]
        payload: Json = {
            "id": str(message.id), "channel_id": str(message.channel_id), "type": 0,
            "author": self.users[message.author_id], "content": message.content,
            "timestamp": _now(), "edited_timestamp": _now() if message.edits else None,
            "tts": False, "mention_everyone": bool(_EVERYONE.search(message.content)),
            "mentions": mentions, "mention_roles": _ROLE.findall(message.content),
            "attachments": [], "embeds": [], "pinned": False, "flags": 0, "components": [],
        }
        if "guild_id" in channel:
            payload["guild_id"] = channel["guild_id"]
            payload["member"] = {k: v for k, v in self._member(message.author_id).items()
                                 if k != "user"}
        reply_to = message.payload.get("_reply_to")
        if reply_to is not None and reply_to in self.messages:
            payload["type"] = 19
            payload["message_reference"] = {"message_id": str(reply_to),
                                            "channel_id": str(message.channel_id)}
            referenced = self.messages[reply_to]
            payload["referenced_message"] = {**self._message_payload(referenced)}
        return payload

    def sent(self, channel_id: int) -> list[Message]:
        """The bot's messages in ``channel_id`` that still exist, in order."""
        return [m for m in self.messages.values()
                if m.channel_id == channel_id and m.author_id == self.bot_id]

    def interaction_replies(self, token: str) -> list[Message]:
        """The messages that answered the slash command with ``token``."""
        return [m for m in self._interactions[token]["messages"] if m.id in self.messages]

    async def wait_until(self, check: Callable[[], bool], within: float = 10.0) -> None:
        """Wait until ``check()`` holds after some REST call; TimeoutError if it does not."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(check)


def would_ping(payload: Mapping[str, Any]) -> bool:
    """Whether Discord would notify anyone for a message sent with this request body.

    Without ``allowed_mentions`` Discord parses every mention in the content.
    """
    content = str(payload.get("content") or "")
    if not (_EVERYONE.search(content) or _MENTION.search(content) or _ROLE.search(content)):
        return False
    allowed = payload.get("allowed_mentions")
    if allowed is None:
        return True
    return bool(allowed.get("parse") or allowed.get("users") or allowed.get("roles")
                or allowed.get("replied_user"))


def _check_content(body: Mapping[str, Any]) -> str | None:
    content = body.get("content")
    if content is not None and len(content) > MAX_CONTENT:
        return f"Invalid Form Body: content: Must be {MAX_CONTENT} or fewer in length."
    return None


async def _write(socket: web.WebSocketResponse, outbox: asyncio.Queue[str]) -> None:
    while not socket.closed:
        text = await outbox.get()
        try:
            await socket.send_str(text)
        except ConnectionError:
            return  # the session log keeps what was lost, for the resume


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py decodes a body as JSON only if Content-Type is exactly this (no charset).
    return web.Response(body=json.dumps(data).encode(), status=status,
                        headers={"Content-Type": "application/json"})


def _ok(data: Any) -> web.Response:
    return _json(data)


def _no_content() -> web.Response:
    return web.Response(status=204)

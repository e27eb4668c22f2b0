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
        await discord.wait_until(lambda: [m.content for m in discord.sent(channel)] == ["hello"])
        discord.gateway.reconnect()  # op 7; the bot must resume

The gateway (:class:`bots.testing.discord_gateway.FakeGateway`, ``discord.gateway``)
speaks HELLO, IDENTIFY -> READY (+ GUILD_CREATE), RESUME -> missed events + RESUMED,
heartbeats, op 7 RECONNECT and op 9 INVALID SESSION. REST answers with
``Content-Type: application/json`` exactly and marks 429s with a ``Via`` header, as
discord.py expects of the real thing (without ``Via`` it takes a 429 for a Cloudflare ban).
Message content over 2,000 characters is refused with a 400, as Discord does.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

from bots.testing.discord_gateway import FakeGateway
from bots.testing.discord_http import (
    EVERYONE,
    MAX_CONTENT,
    MENTION,
    ROLE,
    Fault,
    Limits,
    check_content,
    json_response,
    no_content,
    now,
    ok,
    would_ping,
)

__all__ = ["MAX_CONTENT", "FakeDiscord", "FakeGateway", "Message", "Request", "would_ping"]

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


class FakeDiscord:
    """The far end of discord.py's wire; see the module docstring."""

    def __init__(
        self, *, token: str = "fake-bot-token", heartbeat_interval: float = 30.0,
        bucket: tuple[int, float] | None = None,
    ) -> None:
        self.token = token
        self.limits = Limits(bucket)  # bucket: (requests, seconds) per channel's route
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
        self._interactions: dict[str, Json] = {}  # token -> interaction
        self.gateway = FakeGateway(token, self._greeting, heartbeat_interval=heartbeat_interval)
        self._changed = asyncio.Condition()
        self._nonces: dict[tuple[int, str], int] = {}  # (channel, nonce) -> message id
        self._runner: web.AppRunner | None = None
        self._port = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on 127.0.0.1, on a free port."""
        app = web.Application(middlewares=[self._rest_middleware])
        app.router.add_get("/gateway", self.gateway.handle)
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
                                      "archive_timestamp": now(), "locked": False}}
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
        return {"user": self.users[user_id], "roles": [], "joined_at": now(), "deaf": False,
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

    # -- the gateway, driven by the test: see ``self.gateway`` ----------------------------

    def dispatch(self, event: str, data: Json) -> None:
        """Send a gateway event (see :meth:`FakeGateway.dispatch`)."""
        self.gateway.dispatch(event, data)

    def _greeting(self, session_id: str) -> list[tuple[str, Json]]:
        ready = {
            "v": 10, "user": self.bot, "session_id": session_id,
            "resume_gateway_url": self.gateway_url, "shard": [0, 1],
            "guilds": [{"id": g["id"], "unavailable": True} for g in self.guilds.values()],
            "application": {"id": str(self.application_id), "flags": 0},
        }
        return [("READY", ready), *(("GUILD_CREATE", g) for g in self.guilds.values())]

    # -- REST --------------------------------------------------------------------------

    def rate_limit(
        self, count: int, *, path: str = "/messages", retry_after: float = 0.05,
        is_global: bool = False,
    ) -> None:
        """Answer the next ``count`` requests whose path contains ``path`` with a 429."""
        self.limits.faults += [Fault(path, 429, retry_after, is_global)] * count

    def fail(self, count: int, *, path: str, status: int = 403) -> None:
        """Answer the next ``count`` requests whose path contains ``path`` with ``status``."""
        self.limits.faults += [Fault(path, status)] * count

    @property
    def faults_left(self) -> int:
        """Injected 429s and failures not yet served."""
        return len(self.limits.faults)

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
            response = json_response({"message": "401: Unauthorized", "code": 0}, 401)
        elif (fault := self.limits.take_fault(request.path)) is not None:
            response = fault.response()
        elif ((bucket := self.limits.bucket_of(request.method, request.path)) is not None
              and not bucket.take()):
            response = Fault(request.path, 429, bucket.reset_after()).response()
            response.headers.update(bucket.headers())
        else:
            response = await handler(request)
            if bucket is not None:
                response.headers.update(bucket.headers())
        record.status = response.status
        async with self._changed:
            self._changed.notify_all()
        return response

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
        return ok(self.bot)

    async def _gateway_info(self, request: web.Request) -> web.Response:
        return ok({"url": self.gateway_url, "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}})

    async def _typing(self, request: web.Request) -> web.Response:
        return no_content()

    async def _application(self, request: web.Request) -> web.Response:
        return ok({"id": str(self.application_id), "name": "parley", "description": "",
                    "icon": None, "bot_public": True, "bot_require_code_grant": False,
                    "owner": self.users[self.bot_id], "verify_key": "0" * 64, "flags": 0,
                    "summary": "", "team": None})

    async def _sync_commands(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.commands = [{"id": str(self._id()), "application_id": str(self.application_id),
                          "version": "1", "type": 1, "options": [], "default_member_permissions":
                          None, "dm_permission": True, "nsfw": False, **command}
                         for command in body]
        return ok(self.commands)

    async def _create_message(self, request: web.Request) -> web.Response:
        channel_id = int(request.match_info["channel"])
        if channel_id not in self.channels:
            return json_response({"message": "Unknown Channel", "code": 10003}, 404)
        body = await request.json()
        problem = check_content(body)
        if problem:
            return json_response({"message": problem, "code": 50035}, 400)
        nonce = body.get("nonce")
        if body.get("enforce_nonce") and (channel_id, nonce) in self._nonces:
            # Discord creates a message once per nonce (within a few minutes).
            existing = self.messages.get(self._nonces[channel_id, nonce])
            if existing is not None:
                return ok(self._message_payload(existing))
        reference = (body.get("message_reference") or {}).get("message_id")
        message = self._store(channel_id, self.bot_id, body.get("content") or "", body,
                              reply_to=int(reference) if reference else None)
        if body.get("enforce_nonce") and nonce:
            self._nonces[channel_id, nonce] = message.id
        return ok(self._message_payload(message))

    async def _edit_message(self, request: web.Request) -> web.Response:
        message = self.messages.get(int(request.match_info["message"]))
        if message is None:
            return json_response({"message": "Unknown Message", "code": 10008}, 404)
        body = await request.json()
        problem = check_content(body)
        if problem:
            return json_response({"message": problem, "code": 50035}, 400)
        if "content" in body:
            message.content = body["content"] or ""
        message.versions.append((time.monotonic(), message.content, body))
        return ok(self._message_payload(message))

    async def _delete(self, request: web.Request) -> web.Response:
        self.messages.pop(int(request.match_info["message"]), None)
        return no_content()

    async def _callback(self, request: web.Request) -> web.Response:
        entry = self._interactions.get(request.match_info["token"])
        if entry is None:
            return json_response({"message": "Unknown interaction", "code": 10062}, 404)
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
        return ok({"interaction": {"id": interaction["id"], "type": 2,
                                    "response_message_loading": kind == 5,
                                    "response_message_ephemeral": False},
                    "resource": resource})

    async def _edit_original(self, request: web.Request) -> web.Response:
        entry = self._interactions.get(request.match_info["token"])
        if entry is None or not entry["messages"]:
            return json_response({"message": "Unknown Webhook", "code": 10015}, 404)
        request.match_info["message"] = str(entry["messages"][0].id)
        return await self._edit_message(request)

    async def _followup(self, request: web.Request) -> web.Response:
        entry = self._interactions.get(request.match_info["token"])
        if entry is None:
            return json_response({"message": "Unknown Webhook", "code": 10015}, 404)
        body = await request.json()
        problem = check_content(body)
        if problem:
            return json_response({"message": problem, "code": 50035}, 400)
        message = self._store(entry["channel_id"], self.bot_id, body.get("content") or "", body)
        entry["messages"].append(message)
        return ok(self._message_payload(message))

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
        mentions = [self.users[int(i)] for i in MENTION.findall(message.content)
                    if int(i) in self.users]
        payload: Json = {
            "id": str(message.id), "channel_id": str(message.channel_id), "type": 0,
            "author": self.users[message.author_id], "content": message.content,
            "timestamp": now(), "edited_timestamp": now() if message.edits else None,
            "tts": False, "mention_everyone": bool(EVERYONE.search(message.content)),
            "mentions": mentions, "mention_roles": ROLE.findall(message.content),
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

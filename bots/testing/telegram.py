"""A fake Telegram Bot API on 127.0.0.1, for tests that drive the real client.

Point python-telegram-bot (or Parley's ``[adapters.telegram] api_base_url``) at
:attr:`FakeTelegram.base_url`; the fake queues updates for ``getUpdates`` or posts them
to a webhook, keeps the chats' messages, records every call with its time, and fails
calls on request (429 with ``retry_after``, 5xx, anything)::

    async with FakeTelegram() as telegram:
        telegram.message("hello", chat_id=42)
        ...  # start the bot with api_base_url = telegram.base_url
        await telegram.wait_for(lambda: telegram.texts(42))
        assert telegram.texts(42) == ["Hi! How can I help?"]

It checks what Telegram checks and bots get wrong: text length in UTF-16 units after
entity parsing (4,096), HTML that does not parse, empty text, an edit that changes
nothing, an edit of a message that does not exist. See docs/testing.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

from bots.testing.telegram_api import ApiError, entities_of, int_param, params_of, visible_text

BOT_ID = 7000001


@dataclass(frozen=True, slots=True)
class Call:
    """One request the bot made: method, parameters, when, and how it was answered."""

    method: str
    params: Mapping[str, Any]
    at: float  # time.monotonic()
    status: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """One webhook POST the fake made, and the bot's answer (0: no answer)."""

    update_id: int
    status: int
    at: float


@dataclass(slots=True)
class _Planned:
    method: str  # "*": any method but getUpdates
    status: int
    description: str
    retry_after: float | None
    times: int


@dataclass(slots=True)
class _Chat:
    messages: dict[int, str] = field(default_factory=dict)  # visible text, by message id
    next_id: int = 1


class FakeTelegram:
    """The fake server; an async context manager (see the module docstring)."""

    def __init__(
        self,
        *,
        token: str = "123456:TEST-TOKEN",
        username: str = "parley_test_bot",
        redelivery_delay: float = 0.05,
        max_deliveries: int = 20,
    ) -> None:
        self.token = token
        self.username = username
        self.redelivery_delay = redelivery_delay
        self.max_deliveries = max_deliveries
        self.calls: list[Call] = []
        self.deliveries: list[Delivery] = []
        self.commands: list[dict[str, str]] = []
        self.webhook: dict[str, Any] | None = None
        self.chats: dict[int, _Chat] = {}
        self._updates: list[dict[str, Any]] = []  # pending, in order
        self._next_update = 1
        self._next_user_message = 1
        self._plans: list[_Planned] = []
        self._storm: tuple[float, float, random.Random] | None = None
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._delivery: asyncio.Task[None] | None = None
        self._port = 0

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """What to configure as ``api_base_url``: http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self._port}"

    async def __aenter__(self) -> FakeTelegram:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_delivery()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- what users do ------------------------------------------------------------------

    def message(
        self,
        text: str,
        *,
        chat_id: int = 1001,
        user_id: int | None = None,
        chat_type: str = "private",
        first_name: str = "Ada",
        reply_to: int | None = None,
        thread_id: int | None = None,
    ) -> dict[str, Any]:
        """Queue a user's text message as an update; returns the update.

        ``bot_command`` and ``mention`` entities are added as Telegram would;
        ``reply_to`` is a message id in the chat (the bot's own, if it sent it).
        """
        user_id = user_id if user_id is not None else chat_id
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = first_name
        else:
            chat["title"] = f"group {chat_id}"
        message: dict[str, Any] = {
            "message_id": self._next_user_message,
            "date": int(time.time()),
            "chat": chat,
            "from": {"id": user_id, "is_bot": False, "first_name": first_name},
            "text": text,
        }
        self._next_user_message += 1
        entities = entities_of(text)
        if entities:
            message["entities"] = entities
        if thread_id is not None:
            message["message_thread_id"] = thread_id
            message["is_topic_message"] = True
        if reply_to is not None:
            own = reply_to in self.chats.get(chat_id, _Chat()).messages
            sender = ({"id": BOT_ID, "is_bot": True, "first_name": "Parley",
                       "username": self.username} if own else
                      {"id": user_id + 1, "is_bot": False, "first_name": "Bob"})
            message["reply_to_message"] = {"message_id": reply_to, "date": int(time.time()),
                                           "chat": chat, "from": sender, "text": "..."}
        return self.update({"message": message})

    def update(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Queue any update (``update_id`` is added unless given); returns it."""
        update = dict(body)
        if "update_id" not in update:
            update["update_id"] = self._next_update
            self._next_update += 1
        self._updates.append(update)
        self._notify()
        return update

    async def post(
        self, url: str, body: bytes | Mapping[str, Any], *, secret: str | None = None
    ) -> int:
        """POST one update (or raw bytes) to a webhook as Telegram would; the status."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["X-Telegram-Bot-Api-Secret-Token"] = secret
        async with ClientSession(timeout=ClientTimeout(total=120)) as session:
            async with session.post(url, data=data, headers=headers) as response:
                await response.read()
                return response.status

    # -- faults -------------------------------------------------------------------------

    def fail(
        self,
        method: str = "*",
        *,
        status: int = 429,
        times: int = 1,
        retry_after: float | None = None,
        description: str | None = None,
    ) -> None:
        """Answer the next ``times`` calls of ``method`` ("*": any but getUpdates) with
        an error; a 429 carries ``retry_after`` seconds (default 0.05)."""
        if status == 429 and retry_after is None:
            retry_after = 0.05
        text = description or {429: "Too Many Requests: retry later",
                               500: "Internal Server Error", 502: "Bad Gateway"}.get(
            status, f"Error {status}")
        self._plans.append(_Planned(method, status, text, retry_after, times))

    def storm(self, share: float, *, retry_after: float = 0.02, seed: int = 0) -> None:
        """Answer a ``share`` of all calls (but getUpdates) with 429 until :meth:`calm`."""
        self._storm = (share, retry_after, random.Random(seed))

    def calm(self) -> None:
        """End a :meth:`storm` and drop planned failures."""
        self._storm = None
        self._plans.clear()

    # -- what the test looks at ---------------------------------------------------------

    def texts(self, chat_id: int) -> list[str]:
        """The bot's messages visible in a chat now, oldest first."""
        chat = self.chats.get(chat_id)
        return [chat.messages[k] for k in sorted(chat.messages)] if chat else []

    def calls_to(self, method: str, *, chat_id: int | None = None, ok: bool = True) -> list[Call]:
        """The recorded calls of ``method`` (to ``chat_id``), the successful ones by default."""
        return [c for c in self.calls if c.method == method
                and (chat_id is None or c.params.get("chat_id") == chat_id)
                and (not ok or c.status == 200)]

    def delivered(self, update: Mapping[str, Any]) -> list[int]:
        """The bot's answers (HTTP statuses) to each webhook delivery of ``update``."""
        return [d.status for d in self.deliveries if d.update_id == update["update_id"]]

    @property
    def pending(self) -> int:
        """Updates not yet confirmed by the bot."""
        return len(self._updates)

    async def wait_for(self, predicate: Callable[[], Any], within: float = 10.0) -> None:
        """Wait until ``predicate()`` is true; re-checked after every call the bot makes.
        Raises ``TimeoutError`` after ``within`` seconds."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(predicate)

    # -- the API ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await params_of(request)
        status, payload = 200, None
        try:
            if request.match_info["token"] != self.token:
                raise ApiError(401, "Unauthorized")
            self._planned_failure(method)
            handler = getattr(self, f"_api_{method}", None)
            if handler is None:
                raise ApiError(404, "Not Found: method not found")
            payload = await handler(params)
            body: dict[str, Any] = {"ok": True, "result": payload}
        except ApiError as exc:
            status = exc.status
            body = {"ok": False, "error_code": exc.status, "description": exc.description}
            if exc.retry_after is not None:
                body["parameters"] = {"retry_after": exc.retry_after}
        self.calls.append(Call(method, params, time.monotonic(), status))
        self._notify()
        return web.json_response(body, status=status)

    def _planned_failure(self, method: str) -> None:
        if method == "getUpdates":
            return
        for plan in self._plans:
            if plan.method in (method, "*") and plan.times > 0:
                plan.times -= 1
                raise ApiError(plan.status, plan.description, plan.retry_after)
        if self._storm is not None and method != "getMe":
            share, retry_after, rng = self._storm
            if rng.random() < share:
                raise ApiError(429, "Too Many Requests: retry later", retry_after)

    async def _api_getMe(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {"id": BOT_ID, "is_bot": True, "first_name": "Parley", "username": self.username,
                "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False}

    async def _api_getUpdates(self, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self.webhook is not None:
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active")
        offset = params.get("offset")
        if isinstance(offset, int):
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        wait = min(float(params.get("timeout") or 0), 1.0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait), self._changed:
                await self._changed.wait_for(lambda: bool(self._updates))
        return list(self._updates[: int(params.get("limit") or 100)])

    async def _api_sendMessage(self, params: Mapping[str, Any]) -> dict[str, Any]:
        chat_id = int_param(params, "chat_id")
        text = visible_text(params)
        chat = self.chats.setdefault(chat_id, _Chat())
        message_id, chat.next_id = chat.next_id + 100000, chat.next_id + 1
        chat.messages[message_id] = text
        return self._sent(chat_id, message_id, text)

    async def _api_editMessageText(self, params: Mapping[str, Any]) -> dict[str, Any]:
        chat_id, message_id = int_param(params, "chat_id"), int_param(params, "message_id")
        text = visible_text(params)
        chat = self.chats.get(chat_id)
        if chat is None or message_id not in chat.messages:
            raise ApiError(400, "Bad Request: message to edit not found")
        if chat.messages[message_id] == text:
            raise ApiError(400, "Bad Request: message is not modified: specified new message "
                                "content and reply markup are exactly the same")
        chat.messages[message_id] = text
        return self._sent(chat_id, message_id, text)

    async def _api_deleteMessage(self, params: Mapping[str, Any]) -> bool:
        chat = self.chats.get(int_param(params, "chat_id"))
        if chat is None or chat.messages.pop(int_param(params, "message_id"), None) is None:
            raise ApiError(400, "Bad Request: message to delete not found")
        return True

    async def _api_sendChatAction(self, params: Mapping[str, Any]) -> bool:
        int_param(params, "chat_id")
        return True

    async def _api_setMyCommands(self, params: Mapping[str, Any]) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise ApiError(400, "Bad Request: commands must be a list")
        self.commands = commands
        return True

    async def _api_setWebhook(self, params: Mapping[str, Any]) -> bool:
        url = params.get("url")
        if not url:
            return await self._api_deleteWebhook(params)
        await self._stop_delivery()
        if params.get("drop_pending_updates") in (True, "true", "True"):
            self._updates.clear()
        self.webhook = dict(params)
        self._delivery = asyncio.create_task(self._deliver(str(url),
                                                           params.get("secret_token")))
        return True

    async def _api_deleteWebhook(self, params: Mapping[str, Any]) -> bool:
        await self._stop_delivery()
        self.webhook = None
        if params.get("drop_pending_updates") in (True, "true", "True"):
            self._updates.clear()
        return True

    async def _api_getWebhookInfo(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {"url": (self.webhook or {}).get("url", ""), "has_custom_certificate": False,
                "pending_update_count": len(self._updates)}

    async def _api_close(self, params: Mapping[str, Any]) -> bool:
        return True

    def _sent(self, chat_id: int, message_id: int, text: str) -> dict[str, Any]:
        return {"message_id": message_id, "date": int(time.time()), "text": text,
                "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},
                "from": {"id": BOT_ID, "is_bot": True, "first_name": "Parley",
                         "username": self.username}}

    # -- webhook delivery ---------------------------------------------------------------

    async def _deliver(self, url: str, secret: Any) -> None:
        """Post pending updates one at a time, in order, again after a failure."""
        async with ClientSession(timeout=ClientTimeout(total=60)) as session:
            while True:
                async with self._changed:
                    await self._changed.wait_for(lambda: bool(self._updates))
                update = self._updates[0]
                headers = {"X-Telegram-Bot-Api-Secret-Token": str(secret)} if secret else {}
                try:
                    async with session.post(url, json=update, headers=headers) as response:
                        status = response.status
                except (OSError, TimeoutError):
                    status = 0
                self.deliveries.append(Delivery(update["update_id"], status, time.monotonic()))
                tries = sum(1 for d in self.deliveries if d.update_id == update["update_id"])
                if 200 <= status < 300 or tries >= self.max_deliveries:
                    if self._updates and self._updates[0] is update:
                        self._updates.pop(0)
                else:
                    await asyncio.sleep(self.redelivery_delay)
                self._notify()

    async def _stop_delivery(self) -> None:
        task, self._delivery = self._delivery, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

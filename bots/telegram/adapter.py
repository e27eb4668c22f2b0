"""The Telegram channel: updates in (long polling or a webhook), streamed replies out.

Runs python-telegram-bot's ``Application`` under Parley's lifecycle (``initialize``,
``start``; ``stop`` and ``shutdown`` in reverse), never its blocking ``run_*``. Updates
do not pass through PTB's ``Updater``, which confirms an update as soon as it is
fetched: long polling is :class:`~bots.telegram.polling.Poller`, which confirms one
only once it was handled, so an update survives the death of the process answering it.
In webhook mode the update handler is mounted on the web channel's
aiohttp server (see :meth:`TelegramAdapter.http_routes`): a request with the wrong
secret is refused (403); the answer is 200 only once the reply was delivered, so a
failure makes Telegram deliver the update again, and a redelivered update is answered
once (update ids and message ids both dedupe).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web
from telegram import BotCommand, Update
from telegram.error import InvalidToken, TelegramError
from telegram.ext import Application, ApplicationBuilder

from bots.base import adapter_settings, utf16_length
from bots.streaming import StreamingReply, StreamLimits
from bots.telegram.config import TelegramSettings
from bots.telegram.intake import Intake
from bots.telegram.outbound import Pacer, TelegramChat, call
from bots.telegram.polling import Poller
from bots.telegram.transport import SanitisingRequest
from bots.telegram.updates import Addressed, addressed
from core.config import BotSettings
from core.engine import Engine
from core.errors import ConfigError
from core.plugin_services import DeliveryError
from core.streams import closing
from core.types import ConversationKey, IncomingMessage, ReplyEvent

log = logging.getLogger(__name__)

CHANNEL = "telegram"
MAX_MESSAGE_UNITS = 4096
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
ALLOWED_UPDATES = ("message",)
# Replies that could not be delivered, kept for the redelivery of their update.
OUTBOX_SIZE = 1000
# Message ids whose reply this process delivered: a redelivery of one is not answered
# again (the engine's replay of it is dropped). More than a redelivery window holds.
DELIVERED_SIZE = 10_000
# How long stop() lets replies in progress finish.
SHUTDOWN_TIMEOUT = 10.0


class TelegramAdapter:
    """Serves a bot on Telegram; see the module docstring."""

    channel = CHANNEL

    def __init__(self, settings: BotSettings, section: Mapping[str, Any]) -> None:
        self.settings = settings
        self.config = adapter_settings(TelegramSettings, settings, section, CHANNEL)
        self._app: Application[Any, Any, Any, Any, Any, Any] | None = None
        self._engine: Engine | None = None
        self._poller: Poller | None = None
        self._intake = Intake(self._handle)
        self._pacer = Pacer(self.config.limits)
        self._outbox: OrderedDict[str, tuple[StreamingReply[int], str]] = OrderedDict()
        self._delivered: OrderedDict[str, None] = OrderedDict()
        self._unregister: Callable[[], None] | None = None
        self._stopped = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------

    def http_routes(self) -> Sequence[web.RouteDef]:
        """The webhook route, for the bot's HTTP server to serve (webhook mode only)."""
        if self.config.mode != "webhook":
            return []
        return [web.post(self.config.path, self._webhook)]

    async def start(self, engine: Engine) -> None:
        """Connect to the Bot API, register the commands, start receiving updates."""
        if self._app is not None:
            return
        # httpx logs every request URL at INFO, and a Bot API URL contains the token.
        logging.getLogger("httpx").setLevel(max(logging.WARNING,
                                                logging.getLogger("httpx").level))
        self._stopped.clear()
        api = self.config.api_base_url
        app = (
            ApplicationBuilder()
            .token(self.config.token.get_secret_value())
            .base_url(f"{api}/bot")
            .base_file_url(f"{api}/file/bot")
            .get_updates_request(SanitisingRequest(
                read_timeout=self.config.poll_timeout + 10, connection_pool_size=2))
            .updater(None)  # updates come from the Poller or the webhook route
            .build()
        )
        self._app, self._engine = app, engine
        try:
            await self._connect(app, engine)
        except BaseException:
            await self.stop()  # undoes whatever part of the start happened
            raise
        self._unregister = engine.plugins.services.outbox.register(CHANNEL, self._send)
        log.info("bot %s: telegram adapter (@%s, %s)", engine.name, app.bot.username,
                 self.config.mode)

    async def _connect(self, app: Application[Any, Any, Any, Any, Any, Any],
                       engine: Engine) -> None:
        src = self.settings.source
        try:
            await app.initialize()  # getMe: checks the token and the server
        except InvalidToken:
            raise ConfigError(f"{src}: adapters.telegram.token: Telegram refused the token"
                              ) from None
        except TelegramError as exc:
            raise ConfigError(f"{src}: adapters.telegram.api_base_url: cannot reach the Bot "
                              f"API at {self.config.api_base_url}: {exc}") from None
        bot, pacer = app.bot, self._pacer
        commands = self._commands(engine)
        await call(pacer, None, lambda: bot.set_my_commands(commands), group=False,
                   what="setMyCommands")
        if self.config.mode == "webhook":
            secret = self.config.secret_token
            await call(pacer, None, lambda: bot.set_webhook(
                str(self.config.webhook_url), allowed_updates=list(ALLOWED_UPDATES),
                secret_token=secret.get_secret_value() if secret else None),
                group=False, what="setWebhook")
        else:
            # A webhook left by an earlier deployment would make getUpdates fail.
            await call(pacer, None, bot.delete_webhook, group=False, what="deleteWebhook")
        await app.start()
        if self.config.mode == "polling":
            self._poller = Poller(bot, self._intake.submit, timeout=self.config.poll_timeout,
                                  allowed_updates=ALLOWED_UPDATES,
                                  on_error=self._polling_error)
            self._poller.start()

    async def stop(self) -> None:
        """Stop receiving; replies in progress get a few seconds. Idempotent."""
        app, self._app = self._app, None
        poller, self._poller = self._poller, None
        unregister, self._unregister = self._unregister, None
        if unregister is not None:
            unregister()
        try:
            if poller is not None:
                await poller.stop()
            if app is not None:
                if app.running:
                    await _quietly(app.stop())
                await self._intake.drain(SHUTDOWN_TIMEOUT)
                if poller is not None:
                    await poller.confirm()  # what was handled; not what was cut short
                await _quietly(app.shutdown())
        finally:
            self._engine = None
            self._stopped.set()

    async def wait(self) -> None:
        """Return only once stopped: the channel never ends by itself."""
        await self._stopped.wait()

    def _commands(self, engine: Engine) -> list[BotCommand]:
        commands = [BotCommand("start", "start talking to the bot")]
        for command in engine.plugins.commands:
            name = command.name
            if name != "start" and name.isascii() and len(name) <= 32 and name.islower():
                commands.append(BotCommand(name, (command.help or name)[:256]))
        return commands

    # -- updates in ---------------------------------------------------------------------

    def _polling_error(self, exc: TelegramError) -> None:
        log.warning("telegram: polling failed: %s (retrying)", exc)

    async def _webhook(self, request: web.Request) -> web.Response:
        secret = self.config.secret_token
        given = request.headers.get(SECRET_HEADER, "")
        if secret is None or not hmac.compare_digest(
            given.encode(), secret.get_secret_value().encode()
        ):
            log.info("telegram: webhook request with a wrong or missing secret refused")
            return web.Response(status=403, text="forbidden")
        app = self._app
        if app is None or not app.running:
            return web.Response(status=503, text="not ready")  # Telegram tries again
        try:
            data = json.loads(await request.read())
            update = Update.de_json(data, app.bot)
            if not isinstance(update, Update):
                raise ValueError("not an update")
        except Exception as exc:
            # Telegram would only send it again: take it, and say what it was.
            log.debug("telegram: malformed webhook update ignored: %s", exc)
            return web.Response(text="ignored")
        outcome = self._intake.submit(update)
        try:
            # Shielded: Telegram hanging up must not cancel a reply half-way.
            await asyncio.wait_for(asyncio.shield(outcome), self.config.webhook_timeout)
        except TimeoutError:
            return web.Response(status=503, text="still answering")
        except Exception:
            return web.Response(status=500, text="failed; deliver it again")
        return web.Response(text="ok")

    async def _handle(self, update: Update) -> None:
        """Answer one update, if it is a message the bot should answer."""
        app, engine = self._app, self._engine
        if app is None or engine is None:
            raise RuntimeError("the telegram adapter is stopped")
        target = addressed(update, username=app.bot.username, bot_id=app.bot.id,
                           policy=self.config.answer_in_groups)
        if target is None:
            log.debug("telegram: update %d is not a message to answer", update.update_id)
            return
        chat = TelegramChat(app.bot, self._pacer, target.chat_id, group=target.group,
                            thread_id=target.thread_id,
                            reply_to=target.message_id if target.group else None,
                            markdown=self.config.format == "markdown")
        if target.command == "start":
            await chat.send(self.config.start_message)
            return
        message = self._incoming(engine, target)
        pending = self._outbox.pop(message.message_id, None)
        if pending is not None:
            reply, text = pending  # a redelivery of a reply that did not get through
            reply.surface = chat
            try:
                await reply.finish(text)
            except Exception:
                self._undelivered(message, reply, text)
                raise
            self._remember_delivered(message.message_id)
            return
        reply = StreamingReply(chat, self._limits(target), streaming=self.config.streaming)
        try:
            await reply.render(self._unless_delivered(message, engine.handle(message)))
            self._remember_delivered(message.message_id)
        except TelegramError:
            if reply.text is not None:
                self._undelivered(message, reply, reply.text)
            raise
        except Exception:
            # Not Telegram's doing: the same update again would fail again. The user
            # hears so at once, the log and the metric say what happened.
            log.exception("telegram: answering %s failed", message.message_id)
            engine.metrics.errors.labels(engine.name, "telegram").inc()
            await reply.finish(engine.apologies.internal)

    async def _unless_delivered(
        self, message: IncomingMessage, events: AsyncIterator[ReplyEvent]
    ) -> AsyncIterator[ReplyEvent]:
        """The engine's events, less its replay of a reply this process delivered.

        The engine answers a redelivered message with its stored reply (code
        "duplicate"), right for a client that lost it; a Telegram chat already shows it.
        """
        async with closing(events) as stream:
            async for event in stream:
                if event.code == "duplicate" and message.message_id in self._delivered:
                    log.debug("telegram: %s was answered already", message.message_id)
                    return
                yield event

    def _remember_delivered(self, message_id: str) -> None:
        self._delivered[message_id] = None
        while len(self._delivered) > DELIVERED_SIZE:
            self._delivered.popitem(last=False)

    async def _send(self, key: ConversationKey, text: str) -> None:
        """A plugin's own message into a conversation (the outbox's ``send``).

        Paced like replies, but it does not wait for the chat's turn: a command may send
        into its own conversation while its reply holds that turn.
        """
        app = self._app
        if app is None:
            raise DeliveryError("Telegram: the adapter is not running")
        chat, _, thread = key.conversation_id.partition(":")
        try:
            chat_id, thread_id = int(chat), int(thread) if thread else None
        except ValueError:
            raise DeliveryError(f"Telegram: {key.conversation_id!r} is not a chat id") from None
        markdown = self.config.format == "markdown"
        surface = TelegramChat(app.bot, self._pacer, chat_id, group=chat_id < 0,
                               thread_id=thread_id, markdown=markdown)
        limits = StreamLimits(MAX_MESSAGE_UNITS, utf16_length, markdown=markdown)
        for part in limits.split(text):
            await surface.send(part)

    def _incoming(self, engine: Engine, target: Addressed) -> IncomingMessage:
        return IncomingMessage(
            bot=engine.name,
            channel=CHANNEL,
            conversation_id=target.conversation_id,
            user_id=str(target.user_id),
            message_id=f"tg:{target.chat_id}:{target.message_id}",
            text=target.text,
            user_name=target.user_name,
            metadata={"chat_id": str(target.chat_id), "group": str(target.group).lower(),
                      **({"thread_id": str(target.thread_id)} if target.thread_id else {})},
        )

    def _limits(self, target: Addressed) -> StreamLimits:
        limits = self.config.limits
        return StreamLimits(
            max_length=MAX_MESSAGE_UNITS,
            length=utf16_length,
            edit_interval=limits.group_edit_interval if target.group else limits.edit_interval,
            typing_interval=limits.typing_interval,
            markdown=self.config.format == "markdown",
        )

    def _undelivered(self, message: IncomingMessage, reply: StreamingReply[int],
                     text: str) -> None:
        """Keep a reply that did not get through for the update's redelivery."""
        log.error("telegram: the reply to %s could not be delivered", message.message_id)
        if self._engine is not None:
            self._engine.metrics.errors.labels(self._engine.name, "telegram_delivery").inc()
        self._outbox[message.message_id] = (reply, text)
        while len(self._outbox) > OUTBOX_SIZE:
            self._outbox.popitem(last=False)


async def _quietly(step: Any) -> None:
    try:
        await step
    except Exception:
        log.exception("telegram: shutting down")

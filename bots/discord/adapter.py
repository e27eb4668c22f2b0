"""The Discord channel: messages and slash commands in, replies streamed by message edits.

``start`` logs in over REST, syncs the slash commands (``setup_hook``), connects the
gateway in a background task and returns once Discord said READY; ``stop`` lets replies
in progress finish for a few seconds, then closes. discord.py resumes the gateway after
a disconnect (op 7, op 9, a dropped socket) by itself; Discord then replays the events
missed, and a message delivered twice is answered once.

Replies of one conversation (a channel, a thread or a DM) are shown in arrival order:
each message takes its conversation's lane before it reaches the engine, and keeps it
until its reply is fully shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import discord
from discord import app_commands

from bots.base import adapter_settings
from bots.discord.addressing import address
from bots.discord.client import ParleyClient, api_base
from bots.discord.config import DiscordSettings
from bots.discord.surfaces import ChannelSurface, InteractionSurface
from bots.streaming import StreamingReply, StreamLimits, Surface
from core.config import BotSettings
from core.engine import Engine
from core.errors import ConfigError, ParleyError
from core.lanes import Lanes, SlowDown
from core.plugin_services import DeliveryError
from core.types import ConversationKey, IncomingMessage

log = logging.getLogger(__name__)

CHANNEL = "discord"
# How long stop() lets replies in progress finish before it cuts them off.
SHUTDOWN_TIMEOUT = 10.0
APOLOGY = "Sorry, I couldn't deliver my answer. Please try again."


class DiscordUnavailable(ParleyError):
    """Discord could not be reached, or refused the bot, at start."""


class DiscordAdapter:
    """Serves a bot on Discord; see the module docstring."""

    channel = CHANNEL

    def __init__(self, settings: BotSettings, section: Mapping[str, Any]) -> None:
        self.settings = settings
        self.config = adapter_settings(DiscordSettings, settings, section, CHANNEL)
        self.limits = StreamLimits(
            max_length=self.config.max_message_chars,
            edit_interval=self.config.edit_interval,
            typing_interval=self.config.typing_interval,
        )
        self.client: ParleyClient | None = None
        self._engine: Engine | None = None
        self._gateway: asyncio.Task[None] | None = None
        self._endpoints = contextlib.ExitStack()
        self._stopped = asyncio.Event()
        self._failure: BaseException | None = None  # what ended the gateway, if not stop()
        # The engine's own lanes order answers but let go before the reply is shown; these
        # hold each conversation until it is, with the same admission (max_queued).
        self._lanes = Lanes(max_queued=settings.bot.max_queued,
                            max_in_flight=settings.bot.max_in_flight_per_user)
        self._recent = _RecentIds(self.config.recent_messages)
        self._replying: set[asyncio.Task[Any]] = set()
        self._unregister: Callable[[], None] | None = None  # the outbound sender

    async def start(self, engine: Engine) -> None:
        """Log in, sync slash commands, connect; returns once Discord said READY."""
        if self.client is not None:
            return
        self._stopped.clear()
        self._failure = None
        self._engine = engine
        self._endpoints.enter_context(api_base(self.config.api_base_url,
                                               source=self.settings.source))
        self.client = ParleyClient(self.config, on_message=self._on_message,
                                   commands=self._slash_commands(engine))
        try:
            await self._connect(self.client)
        except BaseException:
            await self.stop()
            raise
        self._unregister = engine.plugins.services.outbox.register(CHANNEL, self._send)
        log.info("bot %s: on Discord as %s", engine.name, self.client.user)

    async def stop(self) -> None:
        """Let replies in progress finish (a few seconds), then disconnect. Idempotent."""
        client, self.client = self.client, None
        unregister, self._unregister = self._unregister, None
        if unregister is not None:
            unregister()
        try:
            if self._replying:
                _, late = await asyncio.wait(set(self._replying), timeout=SHUTDOWN_TIMEOUT)
                for task in late:
                    task.cancel()
            if client is not None:
                await client.close()
            gateway, self._gateway = self._gateway, None
            if gateway is not None:
                gateway.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await gateway
        finally:
            self._endpoints.close()
            self._stopped.set()

    async def wait(self) -> None:
        """Return when stopped; raise if the gateway connection ended for good by itself
        (a refused token or intents, after discord.py's reconnects gave up)."""
        await self._stopped.wait()
        if self._failure is not None:
            raise DiscordUnavailable("Discord: the gateway connection ended") from self._failure

    async def _connect(self, client: ParleyClient) -> None:
        src = self.settings.source
        try:
            await client.login(self.config.token)
        except discord.LoginFailure:
            raise ConfigError(f"{src}: adapters.discord.token: Discord refused the token") from None
        except (discord.HTTPException, OSError) as exc:
            raise DiscordUnavailable(f"Discord: cannot log in: {exc}") from exc
        self._gateway = asyncio.create_task(self._run_gateway(client), name="discord-gateway")
        ready = asyncio.ensure_future(client.wait_until_ready())
        try:
            await asyncio.wait([ready, self._gateway], timeout=self.config.ready_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not client.is_ready():
            if self._gateway.done():
                raise DiscordUnavailable("Discord: the gateway connection failed (see the log)")
            raise DiscordUnavailable(
                f"Discord: the gateway did not become ready within {self.config.ready_timeout} s"
            )

    async def _run_gateway(self, client: ParleyClient) -> None:
        try:
            await client.connect(reconnect=True)
        except Exception as exc:
            log.warning("discord: the gateway connection ended: %r", exc)
            self._failure = exc
        finally:
            self._stopped.set()

    # -- messages ----------------------------------------------------------------------

    async def _on_message(self, message: discord.Message) -> None:
        engine, client = self._engine, self.client
        if engine is None or client is None or client.user is None:
            return
        addressed = address(message, client.user.id, self.config)
        if addressed is None:
            return
        if not self._recent.add(message.id):
            log.debug("discord: message %s delivered again; answered once", message.id)
            return
        text = addressed.text
        if addressed.prefixed and engine.plugins.match_command("/" + text):
            text = "/" + text  # "!help" is "/help"
        incoming = IncomingMessage(
            bot=engine.name,
            channel=CHANNEL,
            conversation_id=addressed.conversation_id,
            user_id=str(message.author.id),
            message_id=str(message.id),
            text=text,
            user_name=message.author.display_name,
            metadata=_where(message.guild, message.channel),
        )
        reference = message if message.guild is not None else None
        surface = ChannelSurface(message.channel, reference=reference,
                                 timeout=self.config.send_timeout)
        await self._reply(engine, incoming, surface, streaming=self.config.streaming)

    async def _reply(
        self, engine: Engine, incoming: IncomingMessage, surface: Surface[Any], *,
        streaming: bool,
    ) -> None:
        # No await before the lane: handlers start in arrival order and must queue so.
        try:
            async with self._lanes.enter(incoming), self._tracked():
                reply = StreamingReply(surface, self.limits, streaming=streaming)
                try:
                    await reply.render(engine.handle(incoming))
                except Exception:
                    log.exception("discord: could not deliver the reply to %s", incoming.key)
                    engine.metrics.errors.labels(engine.name, "discord_send").inc()
                    with contextlib.suppress(Exception):
                        await surface.send(APOLOGY)
        except SlowDown as exc:
            log.debug("discord: refused before the lane: %s", exc)
            engine.metrics.messages.labels(engine.name, CHANNEL, "slow_down").inc()
            with contextlib.suppress(discord.HTTPException):
                await surface.send(engine.apologies.slow_down)

    async def _send(self, key: ConversationKey, text: str) -> None:
        """A plugin's own message into a conversation (``send``); it pings nobody.

        It does not wait for the conversation's lane: a command may send into its own
        conversation while its reply holds the lane.
        """
        client = self.client
        if client is None:
            raise DiscordUnavailable("Discord: the adapter is not running")
        if not key.conversation_id.isdigit():
            raise DeliveryError(f"Discord: {key.conversation_id!r} is not a channel id")
        channel = client.get_partial_messageable(int(key.conversation_id))
        surface = ChannelSurface(channel, timeout=self.config.send_timeout)
        async with self._tracked():
            for part in self.limits.split(text):
                await surface.send(part)

    @contextlib.asynccontextmanager
    async def _tracked(self) -> AsyncIterator[None]:
        task = asyncio.current_task()
        if task is not None:
            self._replying.add(task)
        try:
            yield
        finally:
            self._replying.discard(task)

    # -- slash commands ----------------------------------------------------------------

    def _slash_commands(self, engine: Engine) -> list[app_commands.Command[Any, Any, None]]:
        commands = []
        for command in engine.plugins.commands:
            try:
                commands.append(self._slash_command(command.name, command.help))
            except (ValueError, TypeError) as exc:
                log.warning("discord: /%s cannot be a slash command: %s", command.name, exc)
        return commands

    def _slash_command(self, name: str, help: str) -> app_commands.Command[Any, Any, None]:
        @app_commands.describe(text="what follows the command")
        async def run(interaction: discord.Interaction, text: str | None = None) -> None:
            await self._on_command(interaction, name, text or "")

        return app_commands.Command(name=name, description=(help or f"/{name}")[:100],
                                    callback=run)

    async def _on_command(self, interaction: discord.Interaction, name: str, text: str) -> None:
        engine = self._engine
        if engine is None:
            return
        # Discord wants an answer within 3 s; "thinking..." buys 15 minutes.
        await interaction.response.defer(thinking=True)
        incoming = IncomingMessage(
            bot=engine.name,
            channel=CHANNEL,
            conversation_id=str(interaction.channel_id),
            user_id=str(interaction.user.id),
            message_id=f"interaction:{interaction.id}",
            text=f"/{name} {text}".strip(),
            user_name=interaction.user.display_name,
            metadata=_where(interaction.guild, interaction.channel),
        )
        surface = InteractionSurface(interaction, timeout=self.config.send_timeout)
        await self._reply(engine, incoming, surface, streaming=False)
        if not surface.answered:
            with contextlib.suppress(discord.HTTPException):
                await interaction.delete_original_response()


def _where(guild: discord.Guild | None, channel: Any) -> dict[str, str]:
    place = {"channel_id": str(channel.id)} if channel is not None else {}
    if guild is not None:
        place["guild_id"] = str(guild.id)
    return place


class _RecentIds:
    """The last ``size`` message ids seen, to answer a redelivered message once."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[int, None] = OrderedDict()

    def add(self, message_id: int) -> bool:
        """Remember ``message_id``; False if it was already there."""
        if message_id in self._ids:
            return False
        self._ids[message_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return True

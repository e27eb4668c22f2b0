"""discord.py's client, as the adapter runs it: endpoints from config, robust to bad frames.

Everything that reaches into discord.py beyond its public API is in this module:

- the gateway URL is set per client, by the HTTP client that opens the gateway socket
  (discord.py itself always connects to its class-wide default first);
- the REST base URL is discord.py's class-wide ``Route.BASE``, which interaction
  responses read too; :func:`api_base` sets it for as long as an adapter runs and puts
  the previous value back, refusing a second adapter that wants another one;
- a gateway frame that is not a well-formed event, and an event whose payload discord.py
  cannot parse, are dropped with a debug log instead of ending the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordClientWebSocketResponse
from discord.http import HTTPClient, Route

from bots.discord.config import DiscordSettings
from core.errors import ConfigError

log = logging.getLogger(__name__)

MessageHandler = Callable[[discord.Message], Awaitable[None]]


@contextlib.contextmanager
def api_base(url: str | None, *, source: str) -> Iterator[None]:
    """discord.py's REST calls go to ``url`` inside the block (None: leave it as it is)."""
    if url is None:
        yield
        return
    url = url.rstrip("/")
    previous = Route.BASE
    default = f"https://discord.com/api/v{discord.http.INTERNAL_API_VERSION}"
    if previous not in (default, url):
        raise ConfigError(
            f"{source}: adapters.discord.api_base_url: another Discord adapter in this "
            f"process uses {previous!r}; one process can reach one Discord API"
        )
    Route.BASE = url
    try:
        yield
    finally:
        Route.BASE = previous


class ParleyClient(discord.Client):
    """A ``discord.Client`` with the gateway and REST endpoints of ``config``.

    ``on_message`` gets every MESSAGE_CREATE; ``commands`` are the slash commands synced
    in ``setup_hook`` (when ``config.sync_commands``).
    """

    def __init__(
        self,
        config: DiscordSettings,
        *,
        on_message: MessageHandler,
        commands: Sequence[app_commands.Command[Any, Any, None]] = (),
    ) -> None:
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the developer portal
        super().__init__(
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            guild_ready_timeout=config.guild_ready_timeout,
            chunk_guilds_at_startup=False,
            max_messages=None,
        )
        self._sync = config.sync_commands
        self._reidentify_delay = config.reidentify_delay
        self._on_message = on_message
        # discord.Client has no hook for its HTTP client; the state must share the new one.
        self.http = _GatewayHTTP(self.loop, gateway_url=config.gateway_url)
        self._connection.http = self.http
        parsers = self._connection.parsers
        for event, parser in list(parsers.items()):
            parsers[event] = _guarded(event, parser)
        self.tree = app_commands.CommandTree(self)
        for command in commands:
            self.tree.add_command(command)

    async def setup_hook(self) -> None:
        """Sync the slash commands, once, after login and before the gateway connects."""
        if not self._sync:
            return
        try:
            synced = await self.tree.sync()
        except discord.HTTPException as exc:
            # Messages still work; commands can be synced on the next start.
            log.warning("discord: could not sync slash commands: %s", exc)
        else:
            log.info("discord: synced %d slash commands", len(synced))

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """Wait ``reidentify_delay`` before identifying again (discord.py: always 5 s)."""
        if not initial:
            await asyncio.sleep(self._reidentify_delay)

    async def on_message(self, message: discord.Message) -> None:
        """Hand every message to the adapter."""
        await self._on_message(message)


class _GatewayHTTP(HTTPClient):
    """discord.py's HTTP client, opening the gateway at ``gateway_url`` if one is set."""

    def __init__(self, loop: Any, *, gateway_url: str | None) -> None:
        super().__init__(loop)
        self._gateway_url = yarl.URL(gateway_url) if gateway_url else None
        self._ws_session: aiohttp.ClientSession | None = None

    async def ws_connect(self, url: str, *, compress: int = 0) -> aiohttp.ClientWebSocketResponse:
        """Open the gateway socket (same options as discord.py's, on a session of our own)."""
        target = yarl.URL(url)
        if self._gateway_url is not None:
            # Resumes go to the URL READY named; through a proxy they go to the proxy.
            target = self._gateway_url.with_query(target.query)
        if self._ws_session is None or self._ws_session.closed:
            self._ws_session = aiohttp.ClientSession(
                ws_response_class=_GuardedSocket, cookie_jar=aiohttp.DummyCookieJar()
            )
        return await self._ws_session.ws_connect(
            target,
            max_msg_size=0,
            timeout=aiohttp.ClientWSTimeout(ws_close=30.0),
            autoclose=False,
            headers={"User-Agent": self.user_agent},
            compress=compress,
        )

    async def close(self) -> None:
        """Close the REST session and the gateway's."""
        try:
            await super().close()
        finally:
            if self._ws_session is not None:
                await self._ws_session.close()
                self._ws_session = None


class _GuardedSocket(DiscordClientWebSocketResponse):
    """Drops text frames that are not well-formed gateway payloads (see :func:`well_formed`).

    Compressed (binary) frames cannot be checked before discord.py inflates them; their
    events are still covered by the guarded parsers.
    """

    async def receive(self, timeout: float | None = None) -> aiohttp.WSMessage:  # noqa: ASYNC109
        while True:
            msg = await super().receive(timeout)
            if msg.type is aiohttp.WSMsgType.TEXT and not well_formed(msg.data):
                log.debug("discord: ignored a malformed gateway frame: %.200r", msg.data)
                continue
            return msg


def well_formed(text: str) -> bool:
    """Whether ``text`` is a gateway payload discord.py can take without crashing."""
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        return False
    if not isinstance(frame, dict) or not isinstance(frame.get("op"), int):
        return False
    op, data = frame["op"], frame.get("d")
    if op == 0:
        if not isinstance(frame.get("t"), str) or not isinstance(data, dict):
            return False
        if not isinstance(frame.get("s"), int | None):
            return False
        if frame["t"] == "READY":
            return all(isinstance(data.get(k), str) for k in ("session_id", "resume_gateway_url"))
    if op == 10:
        return isinstance(data, dict) and isinstance(data.get("heartbeat_interval"), int | float)
    return True


def _guarded(event: str, parser: Callable[[Any], None]) -> Callable[[Any], None]:
    def parse(data: Any) -> None:
        try:
            parser(data)
        except Exception:
            log.debug("discord: ignored a malformed %s event", event, exc_info=True)

    return parse

"""Stopping the web channel while WebSockets are open: the widget's and a plugin's (the
NPC socket). Each is told 1001 (going away) and the server stops at once, instead of
waiting out its shutdown timeout for handlers that would never end by themselves."""

from __future__ import annotations

import asyncio

import aiohttp

from bots.web.adapter import SHUTDOWN_TIMEOUT
from tests.support.widget import GatedEcho, gated_engine, serving, widget_settings
from tests.test_npc_api import village

# Well under the shutdown timeout: a stop that waits for the sockets' handlers takes it all.
PROMPTLY = SHUTDOWN_TIMEOUT / 2


async def _close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """The code of the close frame the server sends (the client reads on meanwhile)."""
    async for _ in ws:
        pass
    return ws.close_code


async def test_an_open_widget_socket_does_not_hold_up_the_stop() -> None:
    async with serving(gated_engine(widget_settings(), GatedEcho())) as served:
        session = await served.session()
        async with served.socket(session["token"]) as ws:
            await ws.send_json({"type": "resume", "after": 0})
            code = asyncio.ensure_future(_close_code(ws))
            await asyncio.wait_for(served.adapter.stop(), PROMPTLY)
            assert await asyncio.wait_for(code, PROMPTLY) == 1001


async def test_an_open_npc_socket_does_not_hold_up_the_stop() -> None:
    async with village() as game, game.http.ws_connect(game.url + "/ws") as ws:
        first = await asyncio.wait_for(ws.receive_json(), PROMPTLY)
        assert first["type"] == "ready"
        code = asyncio.ensure_future(_close_code(ws))
        await asyncio.wait_for(game.adapter.stop(), PROMPTLY)
        assert await asyncio.wait_for(code, PROMPTLY) == 1001



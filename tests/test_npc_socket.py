"""NPC talk over the WebSocket (``/api/v1/npc/ws``) with a real aiohttp client, on the
example village served by the real web channel."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from core.generation.base import GenerationRequest, TokenDelta
from core.testing import ScriptedGenerator
from plugins.npc.socket import MAX_FRAME_BYTES
from tests.test_npc_api import KEY, Game, village

# Moderation's output guard holds text back until a clause is safe; these tests wait on
# lines part-written, so they need every word shown as it comes.
AS_WRITTEN = {"moderation": {"backend": "passthrough"}}
LINE = "The forge is hot today, friend. [emotion: happy] [action: open_shop] [relationship: +3]"


def ws_url(game: Game) -> str:
    return game.url + "/ws"


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    frame = await asyncio.wait_for(ws.receive(), 30)
    assert frame.type is aiohttp.WSMsgType.TEXT, frame
    data: dict[str, Any] = json.loads(frame.data)
    return data


async def until_done(ws: aiohttp.ClientWebSocketResponse, request: str) -> list[dict[str, Any]]:
    """The frames of ``request`` up to its final (or error) frame."""
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["type"] not in ("final", "error"):
        frame = await receive(ws)
        if frame.get("id") == request:
            frames.append(frame)
    return frames


async def test_a_line_streams_and_ends_with_the_talk_answer() -> None:
    async with village(ScriptedGenerator([LINE])) as game:
        plain = await game.talk("mira", "p1", "hello")
        async with game.http.ws_connect(ws_url(game)) as ws:
            ready = await receive(ws)
            assert ready["type"] == "ready"
            assert [n["id"] for n in ready["npcs"]] == ["bram", "mira", "oskar"]
            await ws.send_json({"type": "talk", "id": "a1", "npc": "mira", "player_id": "p2",
                                "text": "hello", "game_state": {"location": "forge"}})
            frames = await until_done(ws, "a1")
            await ws.send_json({"type": "talk", "id": "a2", "npc": "mira", "player_id": "p2",
                                "text": "thanks"})
            again = await until_done(ws, "a2")
    kinds = [f["type"] for f in frames]
    assert kinds[-1] == "final" and kinds.count("delta") > 1, kinds
    typed = "".join(f["text"] for f in frames if f["type"] == "delta")
    final = frames[-1]
    assert typed == final["line"] == "The forge is hot today, friend."
    assert {k: v for k, v in final.items() if k not in ("type", "id", "seq")} == {
        **plain, "player_id": "p2"}
    assert (final["emotion"], final["actions"], final["relationship"]) == (
        "happy", ["open_shop"], 3)
    assert again[-1]["relationship"] == 6  # the socket's lines move the player's state


async def test_lines_of_one_socket_run_at_once_and_barks_too() -> None:
    gates = {"ann": asyncio.Event(), "bob": asyncio.Event()}

    class Gated(ScriptedGenerator):
        """Says its first word, then waits until the test lets the player's line go on."""

        async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
            words = [m.content for m in request.messages if m.role == "user"][-1]
            player = next((p for p in gates if p in words), None)
            first = True
            async for delta in super().stream(request):
                yield delta
                if first and player is not None:
                    await gates[player].wait()
                first = False

    async with village(Gated([LINE]), **AS_WRITTEN) as game:
        async with game.http.ws_connect(ws_url(game)) as ws:
            await receive(ws)
            for player in ("ann", "bob"):
                await ws.send_json({"type": "talk", "id": player, "npc": "mira",
                                    "player_id": player, "text": f"I am {player}."})
            firsts = {(await receive(ws))["id"] for _ in range(2)}
            assert firsts == {"ann", "bob"}  # both lines are being written at once
            gates["bob"].set()
            bob = await until_done(ws, "bob")
            gates["ann"].set()
            ann = await until_done(ws, "ann")
            await ws.send_json({"type": "bark", "id": "b", "npc": "bram",
                                "event": "wolves howl"})
            bark = await until_done(ws, "b")
    assert bob[-1]["player_id"] == "bob" and ann[-1]["player_id"] == "ann"
    assert bark[-1]["type"] == "final" and bark[-1]["player_id"] is None


async def test_closing_the_socket_stops_its_lines() -> None:
    stopped = asyncio.Event()
    gate = asyncio.Event()

    class Stuck(ScriptedGenerator):
        async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
            try:
                yield TokenDelta("Well")
                await gate.wait()  # never set: only a cancelled line ends
                yield TokenDelta(" then.", finish_reason="stop")
            finally:
                stopped.set()

    async with village(Stuck([]), **AS_WRITTEN) as game:
        async with game.http.ws_connect(ws_url(game)) as ws:
            await receive(ws)
            await ws.send_json({"type": "talk", "id": "1", "npc": "mira", "player_id": "p",
                                "text": "hello"})
            assert (await receive(ws))["type"] == "delta"
        await asyncio.wait_for(stopped.wait(), 30)


async def drop_mid_line(game: Game) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start line "1" on a socket and drop the connection after its first delta (no
    close handshake); the ``ready`` frame and that delta."""
    dropped = aiohttp.ClientSession()
    ws = await dropped.ws_connect(ws_url(game))
    ready = await receive(ws)
    await ws.send_json({"type": "talk", "id": "1", "npc": "mira", "player_id": "p",
                        "text": "hello"})
    seen = await receive(ws)
    assert seen["type"] == "delta"
    await dropped.close()
    return ready, seen


async def test_a_dropped_connection_resumes_with_every_frame_it_missed_once() -> None:
    gate = asyncio.Event()

    class Gated(ScriptedGenerator):
        """Says its first word, then waits for the test."""

        async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
            first = True
            async for delta in super().stream(request):
                yield delta
                if first:
                    await gate.wait()
                first = False

    async with village(Gated([LINE]), **AS_WRITTEN) as game:
        ready, seen = await drop_mid_line(game)
        gate.set()  # the line goes on meanwhile
        async with game.http.ws_connect(ws_url(game)) as again:
            assert (await receive(again))["session"] != ready["session"]
            await again.send_json({"type": "resume", "session": ready["session"],
                                   "after": seen["seq"]})
            frames: list[dict[str, Any]] = []
            kinds: set[str] = set()
            while not {"resumed", "final"} <= kinds:
                frames.append(await receive(again))
                kinds.add(frames[-1]["type"])
            await again.send_json({"type": "talk", "id": "2", "npc": "mira",
                                   "player_id": "p", "text": "and now?"})
            later = await until_done(again, "2")
    line = [f for f in frames if f["type"] != "resumed"]
    assert [f["seq"] for f in line + later] == list(
        range(seen["seq"] + 1, seen["seq"] + 1 + len(line) + len(later)))
    assert {f["id"] for f in line} == {"1"}
    assert [f["type"] for f in line].count("final") == 1
    typed = seen["text"] + "".join(f["text"] for f in line if f["type"] == "delta")
    assert typed == line[-1]["line"] == "The forge is hot today, friend."
    assert later[-1]["type"] == "final"


async def test_a_resume_that_cannot_be_kept_is_refused_and_the_socket_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("plugins.npc.sessions.RESUME_SECONDS", 0.05)
    stopped = asyncio.Event()

    class Stuck(ScriptedGenerator):
        async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
            try:
                yield TokenDelta("Well")
                await asyncio.Event().wait()  # only a cancelled line ends
            finally:
                stopped.set()

    async with village(Stuck([]), **AS_WRITTEN) as game:
        ready, seen = await drop_mid_line(game)
        await asyncio.wait_for(stopped.wait(), 30)  # nobody resumed in time
        async with game.http.ws_connect(ws_url(game)) as again:
            await receive(again)
            await again.send_json({"type": "resume", "session": ready["session"],
                                   "after": seen["seq"]})
            assert (await receive(again))["code"] == "resume_lost"
            await again.send_json({"type": "resume", "session": ready["session"],
                                   "after": 0})
            assert (await receive(again))["code"] == "bad_request"  # only first
            await again.send_json({"type": "ping"})
            assert await receive(again) == {"type": "pong"}


async def test_bad_frames_are_answered_and_the_socket_stays_open() -> None:
    async with village(ScriptedGenerator(["Hm."])) as game:
        async with game.http.ws_connect(ws_url(game)) as ws:
            await receive(ws)
            await ws.send_str("{not json")
            assert (await receive(ws))["code"] == "bad_request"
            await ws.send_json({"type": "talk", "id": "x", "npc": "mira", "player_id": "p"})
            refused = await receive(ws)
            assert (refused["id"], refused["code"]) == ("x", "bad_request")
            assert "text" in refused["error"]
            await ws.send_json({"type": "talk", "id": "y", "npc": "nobody",
                                "player_id": "p", "text": "hi"})
            assert (await receive(ws))["code"] == "unknown_npc"
            await ws.send_json({"type": "talk", "id": "z", "npc": "mira",
                                "player_id": "p", "text": "/forget"})
            assert (await receive(ws))["code"] == "bad_request"
            await ws.send_json({"type": "fly", "id": "w"})
            assert (await receive(ws))["code"] == "bad_request"
            await ws.send_bytes(b"\x00")
            assert (await receive(ws))["code"] == "bad_frame"
            await ws.send_json({"type": "ping"})
            assert (await receive(ws)) == {"type": "pong"}
            await ws.send_json({"type": "talk", "id": "ok", "npc": "mira",
                                "player_id": "p", "text": "hi"})
            assert (await until_done(ws, "ok"))[-1]["line"] == "Hm."
            await ws.send_str("x" * (MAX_FRAME_BYTES + 1))
            closing = await asyncio.wait_for(ws.receive(), 30)
            assert closing.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401), ({"Authorization": "Bearer " + "x" * 24}, 401),
    ({"Authorization": f"Bearer {KEY}", "Origin": "https://evil.example"}, 403),
])
async def test_the_socket_has_the_http_api_s_keys(headers: dict[str, str],
                                                  status: int) -> None:
    keys = {"api_keys": [{"key": KEY, "tenant": "game-a"}, {"key": "z" * 24, "tenant": "b"}]}
    async with village(ScriptedGenerator(["Hm. [relationship: +5]"]), web=keys) as game:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await game.http.ws_connect(ws_url(game), headers=headers)
        assert refused.value.status == status


async def test_a_key_s_socket_talks_in_its_tenant() -> None:
    keys = {"api_keys": [{"key": KEY, "tenant": "game-a"}, {"key": "z" * 24, "tenant": "b"}]}
    async with village(ScriptedGenerator(["Hm. [relationship: +5]"]), web=keys) as game:
        async with game.http.ws_connect(ws_url(game), headers=game.headers) as ws:
            await receive(ws)
            await ws.send_json({"type": "talk", "id": "1", "npc": "mira", "player_id": "p1",
                                "text": "hi"})
            assert (await until_done(ws, "1"))[-1]["relationship"] == 5
        assert (await game.call("GET", "/mira/players/p1"))["relationship"] == 5
        game.headers = {"Authorization": "Bearer " + "z" * 24}
        assert (await game.call("GET", "/mira/players/p1"))["relationship"] == 0

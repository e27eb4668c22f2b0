"""The game API on the web channel's server (behind its API keys).

- ``GET /api/v1/npc``: the NPCs, ``[{"id", "name"}]``.
- ``POST /api/v1/npc/{npc}/talk``: ``{"player_id", "text", "game_state"?}`` in; the
  line, its emotion, the allowed actions and the relationship out.
- ``POST /api/v1/npc/{npc}/talk/stream``: the same as Server-Sent Events: ``delta``
  events with the line as it is written, then ``final`` with the whole answer.
- ``GET /api/v1/npc/ws``: a WebSocket for talk and barks, streamed
  (:mod:`plugins.npc.socket`).
- ``POST /api/v1/npc/{npc}/bark``: ``{"event", "game_state"?}``: an ambient line.
- ``POST /api/v1/world/facts``: ``{"facts": [...], "replace"?}``: what every NPC knows
  from now on (the game publishes events: "the bridge burned"); ``GET`` lists them.
- ``GET /api/v1/npc/{npc}/players/{player_id}``: the player's state with the NPC;
  ``PUT`` sets it (``{"relationship"?, "facts"?, "reset"?}``; reset also forgets the
  conversation).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.engine import collect
from core.plugins import Caller, Plugin
from core.streams import closing
from core.types import IncomingMessage, ReplyEvent, ReplyKind
from plugins.npc import reply
from plugins.npc.cards import problems
from plugins.npc.state import PlayerState

if TYPE_CHECKING:
    from plugins.npc import Village

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

BARK_PLAYER = ":bark"  # no player id has a colon: barks never mix with a player
_STATUS = {"invalid_input": 400, "busy": 503, "memory_unavailable": 503,
           "generation_failed": 503, "empty_reply": 502, "slow_down": 429}
Id = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f:]+$")


class Talk(BaseModel):
    """The body of a talk request."""

    model_config = ConfigDict(extra="forbid", strict=True)

    player_id: str = Id
    text: str = Field(min_length=1)
    game_state: dict[str, Any] = {}


class Bark(BaseModel):
    """The body of a bark request: a game event, no player text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    event: str = Field(min_length=1, max_length=2000)
    game_state: dict[str, Any] = {}


class PutPlayer(BaseModel):
    """The body of a PUT of a player's state."""

    model_config = ConfigDict(extra="forbid", strict=True)

    relationship: int | None = None
    facts: list[str] | None = None
    reset: bool = False


class WorldFacts(BaseModel):
    """The body of a POST of world facts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    facts: list[str] = Field(min_length=1)
    replace: bool = False


class Refused(Exception):
    def __init__(self, status: int, reason: str, code: str = "bad_request") -> None:
        super().__init__(reason)
        self.status, self.reason, self.code = status, reason, code


def _error(status: int, reason: str, code: str) -> web.Response:
    return web.json_response({"error": reason, "code": code}, status=status)


def install(plugin: Plugin, village: Village) -> Routes:
    """Register the routes on ``plugin``; they are returned for the WebSocket's use."""
    routes = Routes(village)
    plugin.add_route("GET", "/api/v1/npc", routes.guard(routes.list_npcs))
    plugin.add_route("POST", "/api/v1/npc/{npc}/talk", routes.guard(routes.talk))
    plugin.add_route("POST", "/api/v1/npc/{npc}/talk/stream", routes.guard(routes.talk_stream))
    plugin.add_route("POST", "/api/v1/npc/{npc}/bark", routes.guard(routes.bark))
    plugin.add_route("GET", "/api/v1/world/facts", routes.guard(routes.world_facts))
    plugin.add_route("POST", "/api/v1/world/facts", routes.guard(routes.add_world_facts))
    plugin.add_route("GET", "/api/v1/npc/{npc}/players/{player}", routes.guard(routes.player))
    plugin.add_route("PUT", "/api/v1/npc/{npc}/players/{player}",
                     routes.guard(routes.put_player))
    return routes


class Routes:
    def __init__(self, village: Village) -> None:
        self.village = village

    def guard(self, handler: Any) -> Any:
        """``handler`` with the API's refusals answered as JSON errors."""

        async def serve(request: web.Request, caller: Caller) -> web.StreamResponse:
            try:
                return await handler(request, caller)  # type: ignore[no-any-return]
            except Refused as exc:
                return _error(exc.status, exc.reason, exc.code)

        return serve

    def _npc(self, request: web.Request) -> str:
        npc = request.match_info["npc"]
        if npc not in self.village.cards:
            raise Refused(404, f"no NPC {npc!r}", "unknown_npc")
        return npc

    async def list_npcs(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        return web.json_response({"npcs": [
            {"id": npc, "name": card.name} for npc, card in self.village.cards.items()]})

    async def talk(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        npc = self._npc(request)
        body = await _body(request, Talk)
        message = self.message(caller, npc, body.player_id, body.text, body.game_state)
        return await self._answer(npc, message, await collect(caller.engine.handle(message)))

    async def bark(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        npc = self._npc(request)
        message = self.bark_message(caller, npc, await _body(request, Bark))
        return await self._answer(npc, message, await collect(caller.engine.handle(message)))

    async def talk_stream(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        npc = self._npc(request)
        body = await _body(request, Talk)
        message = self.message(caller, npc, body.player_id, body.text, body.game_state)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        async with aclosing(self.line_events(caller, npc, message)) as events:
            async for kind, data in events:
                await response.write(_sse(kind, data))
        await response.write_eof()
        return response

    async def line_events(self, caller: Caller, npc: str,
                          message: IncomingMessage) -> AsyncGenerator[tuple[str, dict[str, Any]]]:
        """One line as the game sees it written: ``delta`` pieces (``{"text"}``; tags held
        back, so the pieces joined are the final line), ``reset`` when the line starts over,
        then ``final`` with the answer of a talk request, or ``error``."""
        async with closing(caller.engine.handle(message)) as events:
            raw, shown = "", ""
            async for event in events:
                if event.kind is ReplyKind.DELTA:
                    raw += event.text
                    visible = reply.visible_prefix(raw)
                    if visible.startswith(shown) and len(visible) > len(shown):
                        yield "delta", {"text": visible[len(shown):]}
                        shown = visible
                elif event.kind is ReplyKind.RESET:
                    raw, shown = "", ""
                    yield "reset", {}
                elif event.kind in (ReplyKind.FINAL, ReplyKind.NOTICE, ReplyKind.ERROR):
                    status, answer = await self._result(npc, message, event)
                    line = str(answer.get("line", ""))
                    if status == 200 and line.startswith(shown) and len(line) > len(shown):
                        yield "delta", {"text": line[len(shown):]}
                    yield ("final" if status == 200 else "error"), answer

    def bark_message(self, caller: Caller, npc: str, body: Bark) -> IncomingMessage:
        """The message that asks ``npc`` for an ambient line on a game event."""
        text = f"(Game event: {body.event}) Say one short line aloud, to nobody in particular."
        return self.message(caller, npc, BARK_PLAYER, text, body.game_state)

    def message(self, caller: Caller, npc: str, player: str, text: str,
                 game_state: dict[str, Any]) -> IncomingMessage:
        if text.lstrip().startswith("/"):
            raise Refused(400, "text must not start with '/'")
        scope = f"{caller.tenant}:" if caller.tenant else ""
        metadata = {"npc": npc, "player": player,
                    "game_state": json.dumps(game_state, ensure_ascii=False)}
        if caller.tenant:
            metadata["tenant"] = caller.tenant
        return IncomingMessage(
            bot=caller.engine.name, channel=self.village.config.channel,
            conversation_id=f"{scope}npc:{npc}:{player}", user_id=scope + player,
            message_id=uuid.uuid4().hex, text=text, metadata=metadata)

    async def _answer(self, npc: str, message: IncomingMessage,
                      event: ReplyEvent) -> web.StreamResponse:
        status, body = await self._result(npc, message, event)
        return web.json_response(body, status=status)

    async def _result(self, npc: str, message: IncomingMessage,
                      event: ReplyEvent) -> tuple[int, dict[str, Any]]:
        """The status and body answering ``event``; a model's line moves the player state."""
        village = self.village
        if event.kind is ReplyKind.ERROR:
            return _STATUS.get(event.code or "", 500), {
                "error": event.text, "code": event.code or "internal"}
        player = message.metadata["player"]
        if event.kind is ReplyKind.FINAL:
            line = reply.parse(event.text, emotions=village.emotions(npc),
                               actions=village.actions(npc), max_step=village.config.max_step)
        else:  # a notice (moderation's answer): said as it is, nothing acted on
            line = reply.Line(event.text, village.emotions(npc)[0])
        if player == BARK_PLAYER:
            state = PlayerState()
        else:
            state = await village.players.moved(npc, message.user_id,
                                                line.relationship_change, line.facts)
        return 200, {"npc": npc, "player_id": None if player == BARK_PLAYER else player,
                     "line": line.text,
                     "emotion": line.emotion, "actions": list(line.actions),
                     "relationship": state.relationship, "kind": event.kind.value}

    async def world_facts(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        return web.json_response({"facts": await self.village.world_facts(caller.tenant)})

    async def add_world_facts(self, request: web.Request,
                              caller: Caller) -> web.StreamResponse:
        body = await _body(request, WorldFacts)
        facts = await self.village.publish(caller.tenant, body.facts, replace=body.replace)
        return web.json_response({"facts": facts})

    async def player(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        npc = self._npc(request)
        player = _player(request)
        scope = f"{caller.tenant}:" if caller.tenant else ""
        state = await self.village.players.get(npc, scope + player)
        return web.json_response({"npc": npc, "player_id": player, **state.to_dict()})

    async def put_player(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        npc = self._npc(request)
        player = _player(request)
        body = await _body(request, PutPlayer)
        scope = f"{caller.tenant}:" if caller.tenant else ""
        players = self.village.players
        if body.reset:
            await players.reset(npc, scope + player)
            memory = self.village.plugin.services.memory
            if memory is not None:
                await memory.reset(self.message(
                    caller, npc, player, "reset", {}).key)
        state = await players.get(npc, scope + player)
        if body.relationship is not None or body.facts is not None:
            state = await players.put(npc, scope + player, PlayerState(
                state.relationship if body.relationship is None else body.relationship,
                state.facts if body.facts is None else tuple(body.facts)))
        return web.json_response({"npc": npc, "player_id": player, **state.to_dict()})


def _player(request: web.Request) -> str:
    player = request.match_info["player"]
    try:
        Talk(player_id=player, text="x")
    except ValidationError:
        raise Refused(400, "player_id: not a valid id") from None
    return player


async def _body(request: web.Request, model: type[M]) -> M:
    if request.content_type != "application/json":
        raise Refused(415, "the body must be JSON (Content-Type: application/json)",
                       "unsupported_media_type")
    try:
        data = json.loads(await request.read())
    except web.HTTPRequestEntityTooLarge:
        raise Refused(413, "the body is too large", "payload_too_large") from None
    except (ValueError, RecursionError):
        raise Refused(400, "the body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Refused(400, problems(exc)) from None


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

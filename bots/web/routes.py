"""The widget's HTTP routes, mounted on the web adapter's app by :func:`install`.

- ``GET /widget.js``, ``GET /widget.css``: the embeddable widget (any page may load it).
- ``POST /api/v1/session``: a signed session token for a page of an allowed origin;
  ``{"identity": {"user_id", "signature"}}`` for a site's logged-in user, or
  ``{"token": old}`` to renew one (also shortly after it expired). The answer carries the
  token, its expiry, the conversation id and the theme.
- ``GET /api/v1/ws``: the WebSocket API (:mod:`bots.web.ws`).
- ``GET /api/v1/feedback``: the feedback given in the session's conversation
  (``Authorization: Bearer <token>``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any

from aiohttp import web

from bots.web.hub import ChatHub
from bots.web.sessions import Session, TokenRejected
from bots.web.settings import WidgetFields, origin_of
from bots.web.ws import handle_socket, refusal, token_from_protocols
from core.engine import Engine

HUB = web.AppKey("chat_hub", ChatHub)
ASSETS = web.AppKey("widget_assets", dict)
# Files served as they are, with their content type; read once at start.
_ASSETS = {
    "/widget.js": ("widget.js", "application/javascript"),
    "/widget.css": ("widget.css", "text/css"),
    "/demo.css": ("demo.css", "text/css"),
}
_NO_ORIGIN = {"error": "this origin may not use the widget", "code": "forbidden_origin"}


def install(app: web.Application, engine: Engine, config: WidgetFields) -> None:
    """Add the widget's routes to ``app``; the hub starts and stops with the app."""
    hub = ChatHub(engine, config)
    app[HUB] = hub
    app.cleanup_ctx.append(_lifecycle)
    for path in _ASSETS:
        app.router.add_get(path, _asset)
    app.router.add_post("/api/v1/session", _session)
    app.router.add_get("/api/v1/feedback", _feedback)
    for path in ("/api/v1/session", "/api/v1/feedback"):
        app.router.add_route("OPTIONS", path, _preflight)
    app.router.add_get("/api/v1/ws", _websocket)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    app[ASSETS] = await asyncio.to_thread(_read_assets)
    async with app[HUB]:
        yield


def _read_assets() -> dict[str, bytes]:
    static = files("bots.web").joinpath("static")
    return {path: static.joinpath(name).read_bytes() for path, (name, _) in _ASSETS.items()}


async def _asset(request: web.Request) -> web.Response:
    _, content_type = _ASSETS[request.path]
    return web.Response(
        body=request.app[ASSETS][request.path], content_type=content_type, charset="utf-8",
        headers={
            "Cache-Control": "public, max-age=300",
            # Pages of other origins embed these files.
            "Cross-Origin-Resource-Policy": "cross-origin",
            "Access-Control-Allow-Origin": "*",
        },
    )


def origin_allowed(request: web.Request, origin: str | None) -> bool:
    """Whether a page of ``origin`` may open sessions and sockets."""
    if not origin:
        return False
    config = request.app[HUB].config
    if "*" in config.allowed_origins or origin in config.allowed_origins:
        return True
    if config.public_url is not None and origin == origin_of(config.public_url):
        return True
    return origin == f"{request.scheme}://{request.host}"  # Parley's own pages


def _cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    response.headers["Access-Control-Allow-Origin"] = request.headers["Origin"]
    response.headers["Vary"] = "Origin"
    return response


async def _preflight(request: web.Request) -> web.StreamResponse:
    if not origin_allowed(request, request.headers.get("Origin")):
        return web.json_response(_NO_ORIGIN, status=403)
    return _cors(request, web.Response(status=204, headers={
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type, Authorization",
        "Access-Control-Max-Age": "600",
    }))


async def _session(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    if not origin_allowed(request, request.headers.get("Origin")):
        return web.json_response(_NO_ORIGIN, status=403)
    if hub.ip_rate.take(request.remote or "?") > 0.0:
        return _cors(request, web.json_response(
            {"error": "too many requests", "code": "rate_limited"}, status=429,
            headers={"Retry-After": str(int(hub.config.rate_window))}))
    try:
        session = await _requested_session(request, hub)
    except TokenRejected as exc:
        return _cors(request, web.json_response({"error": exc.reason, "code": exc.code},
                                                status=401 if "token" in exc.code else 403))
    except ValueError as exc:
        return _cors(request, web.json_response({"error": str(exc), "code": "bad_request"},
                                                status=400))
    body = {
        "token": hub.signer.sign(session),
        "expires_at": int(session.expires_at),
        "conversation_id": session.conversation_id,
        "verified": session.verified,
        "theme": hub.config.theme.model_dump(),
    }
    return _cors(request, web.json_response(body, headers={"Cache-Control": "no-store"}))


async def _requested_session(request: web.Request, hub: ChatHub) -> Session:
    """The session the body asks for; raises ValueError for a malformed body."""
    data: Any = {}
    if request.can_read_body:
        try:
            data = json.loads(await request.text())
        except (ValueError, RecursionError):
            raise ValueError("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    identity = data.get("identity")
    if identity is not None:
        if not isinstance(identity, dict) or not all(
            isinstance(identity.get(k), str) for k in ("user_id", "signature")
        ):
            raise ValueError("identity needs user_id and signature (strings)")
        return hub.signer.identified(identity["user_id"], identity["signature"])
    previous = data.get("token")
    if isinstance(previous, str) and previous:
        try:
            # Renewing works for a while after expiry, so an idle tab keeps its chat.
            return hub.signer.renewed(hub.signer.verify(previous, grace=hub.signer.ttl))
        except TokenRejected:
            pass  # a stale or foreign token: a new visitor
    return hub.signer.anonymous()


async def _websocket(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    if not origin_allowed(request, request.headers.get("Origin")):
        return web.json_response(_NO_ORIGIN, status=403)
    try:
        session = hub.signer.verify(token_from_protocols(request))
    except TokenRejected as exc:
        return refusal(exc)
    if hub.sockets[request.remote or "?"] >= hub.config.max_sockets_per_ip:
        return web.json_response({"error": "too many sockets from this address",
                                  "code": "rate_limited"}, status=429)
    return await handle_socket(request, hub, session)


async def _feedback(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(request, origin):
        return web.json_response(_NO_ORIGIN, status=403)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    try:
        session = hub.signer.verify(token.strip() if scheme.lower() == "bearer" else "")
    except TokenRejected as exc:
        return refusal(exc)
    records = await hub.feedback.list(hub.ref(session))
    response = web.json_response({"conversation_id": session.conversation_id,
                                  "feedback": [r.to_dict() for r in records]})
    return _cors(request, response) if origin else response

"""The web channel's server plumbing, shared by every route: the application's keys, JSON
errors for the API, security and CORS headers, closing open WebSockets at shutdown, and
the demo page, health, readiness and metrics endpoints. The chat API itself is in
:mod:`bots.web.adapter`, the widget's routes in :mod:`bots.web.routes`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable

from aiohttp import WSCloseCode, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_log import AccessLogger
from prometheus_client import CONTENT_TYPE_LATEST

from bots.web.settings import WebSettings
from core.api_keys import ApiKeys
from core.engine import Engine
from core.generation.base import readiness_of

log = logging.getLogger(__name__)

# No inline script or style anywhere: the page and the widget load theirs from files.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

ENGINE = web.AppKey("engine", Engine)
CONFIG = web.AppKey("web_settings", WebSettings)
KEYS = web.AppKey("web_api_keys", ApiKeys)
PAGE = web.AppKey("page", bytes)
# Every open WebSocket of the app (the widget's, plugins' such as the NPC socket): closed
# with 1001 when the server shuts down, instead of holding the shutdown for its timeout.
SOCKETS = web.AppKey("sockets", weakref.WeakSet[web.WebSocketResponse])


class Refused(Exception):
    """A request answered with an error status without asking the engine."""

    def __init__(self, status: int, reason: str, code: str = "bad_request") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.code = code


def error_response(status: int, reason: str, code: str) -> web.Response:
    return web.json_response({"error": reason, "code": code}, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the API's own errors (unknown route, wrong method, a bug) JSON bodies too."""
    api = request.path.startswith("/api/")
    try:
        return await handler(request)
    except Refused as exc:
        return error_response(exc.status, exc.reason, exc.code)
    except web.HTTPException as exc:
        if api and exc.status >= 400 and exc.content_type != "application/json":
            exc.content_type = "application/json"
            exc.text = json.dumps({"error": exc.reason.lower(), "code": "http_error"})
        raise
    except Exception:
        if not api:
            raise
        log.exception("web: %s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error", "code": "internal"}, status=500)


async def close_sockets(app: web.Application) -> None:
    """Say goodbye (1001, going away) on every open WebSocket: a socket's handler then
    ends by itself, and a widget reconnects (to another front end, or after a restart)."""
    sockets: list[web.WebSocketResponse] = [*app[SOCKETS]]
    await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
                           for ws in sockets), return_exceptions=True)


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    if isinstance(response, web.WebSocketResponse):
        request.app[SOCKETS].add(response)
    response.headers["X-Content-Type-Options"] = "nosniff"
    origin = request.headers.get("Origin")
    allowed = request.app[CONFIG].cors_origins
    if origin and request.path.startswith("/api/") and (origin in allowed or "*" in allowed):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
        response.headers["Vary"] = "Origin"


async def preflight(request: web.Request) -> web.Response:
    # The Allow-Origin header is added by add_headers only for an allowed origin;
    # without it the browser refuses the call.
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": "Content-Type",
            "Access-Control-Max-Age": "600",
        },
    )


async def index(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[PAGE],
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"},
    )


async def healthz(request: web.Request) -> web.Response:
    # Alive unless the generator has given up (its loop died more often than it may restart).
    state = readiness_of(request.app[ENGINE].generator)
    if not state.healthy:
        return web.json_response({"status": "unhealthy", "bot": request.app[ENGINE].name,
                                  "reason": state.reason}, status=503)
    return web.json_response({"status": "ok", "bot": request.app[ENGINE].name})


async def readyz(request: web.Request) -> web.Response:
    state = readiness_of(request.app[ENGINE].generator)
    body = {"status": "ready" if state.ready else "not ready", "bot": request.app[ENGINE].name}
    if not state.ready:
        body["reason"] = state.reason
    return web.json_response(body, status=200 if state.ready else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[ENGINE].metrics.render(),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


class AccessLog(AbstractAccessLogger):
    """aiohttp's access-log line and ``extra`` fields in its default format
    (``%a %t "%r" %s %b "%{Referer}i" "%{User-Agent}i"``), made in one go: 9.5 µs a
    request instead of 17.7 with aiohttp's general formatter (a function per field, a
    datetime per line) and ``logger.info``'s search for its caller."""

    __slots__ = ("_second", "_stamp")

    def __init__(self, logger: logging.Logger,
                 log_format: str = AccessLogger.LOG_FORMAT) -> None:
        super().__init__(logger, log_format)
        self._second = -1
        self._stamp = ""

    @property
    def enabled(self) -> bool:
        """Whether a line would be written (the logger takes INFO)."""
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse,
            time_taken: float) -> None:
        """Write the line of ``request``, answered by ``response`` in ``time_taken`` s."""
        try:
            second = int(time.time() - time_taken)  # when the request began
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(second))
            remote = request.remote or "-"
            version = request.version
            line = f"{request.method} {request.path_qs} HTTP/{version.major}.{version.minor}"
            referer = request.headers.get("Referer", "-")
            agent = request.headers.get("User-Agent", "-")
            headers = {"Referer": referer, "User-Agent": agent}
            status, size = response.status, response.body_length
            # A record made here, not by logger.info(): that would walk the stack for a
            # caller (this method, every time) at a cost like the whole line's.
            self.logger.handle(self.logger.makeRecord(
                self.logger.name, logging.INFO, __file__, 0,
                f'{remote} {self._stamp} "{line}" {status} {size} "{referer}" "{agent}"',
                (), None, "log",
                {"remote_address": remote, "request_start_time": self._stamp,
                 "first_request_line": line, "response_status": status,
                 "response_size": size, "request_header": headers}))
        except Exception:
            self.logger.exception("Error in logging")

"""The web channel: a JSON API on aiohttp, streaming replies as Server-Sent Events.

Routes:

- ``POST /api/v1/chat``: ``{"conversation_id", "user_id", "text", "message_id"?}`` in,
  the reply as one JSON object out.
- ``POST /api/v1/chat/stream``: the same request; the reply's events as they are made
  (``event: delta | final | notice | error``, each ``data`` a JSON object). A failure
  before the reply begins is answered as on ``/api/v1/chat``, with a JSON error status.
- ``GET /api/v1/chat/messages?conversation_id=C&after=N``: what plugins sent into the
  conversation on their own (the outbox), for callers with no socket open.
- ``GET /healthz`` (alive), ``GET /readyz`` (the generator takes requests now, or why
  not), ``GET /metrics`` (Prometheus), and ``GET /`` (a demo page).
- The embeddable widget: ``/widget.js``, sessions, the WebSocket API and feedback
  (:mod:`bots.web.routes`).

A request the adapter refuses (wrong content type, too big, not UTF-8, not JSON, bad
fields) never reaches the engine. Errors of the API are JSON: ``{"error", "code"}``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from importlib.resources import files
from typing import Annotated, Any

from aiohttp import web
from aiohttp.log import access_logger
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from bots.base import adapter_settings
from bots.web import routes, sse
from bots.web.resume import StoreUnavailable
from bots.web.server import (
    CONFIG,
    ENGINE,
    KEYS,
    PAGE,
    SOCKETS,
    AccessLog,
    Handler,
    Refused,
    add_headers,
    close_sockets,
    error_response,
    healthz,
    index,
    json_errors,
    metrics,
    preflight,
    readyz,
)
from bots.web.settings import WebSettings
from bots.web.stores import CHANNEL, WidgetStores, ref_of
from core import jsoncodec
from core.api_keys import ApiKeys, KeyBusy, Unauthorized
from core.config import BotSettings
from core.engine import Engine, collect
from core.errors import ConfigError
from core.plugins import Caller, RouteHandler
from core.ports import ListenAddress
from core.streams import closing
from core.types import IncomingMessage, ReplyEvent, ReplyKind

log = logging.getLogger(__name__)

MAX_ID_CHARS = 256
RETRY_AFTER_SECONDS = 5
# How long stop() lets replies in progress finish before it cuts them off.
SHUTDOWN_TIMEOUT = 10.0

# The HTTP status of an engine error, by code; an unknown code is a 500.
_ERROR_STATUS = {
    "invalid_input": 400,
    "busy": 503,
    "memory_unavailable": 503,
    "generation_failed": 503,
    "empty_reply": 502,
    "slow_down": 429,
    "plugin_failed": 500,
}
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")



def _check_id(value: str) -> str:
    if _CONTROL.search(value):
        raise PydanticCustomError("control_character", "must not contain control characters")
    if not value.strip():
        raise PydanticCustomError("blank", "must not be blank")
    return value


Id = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=MAX_ID_CHARS),
    AfterValidator(_check_id),
]


class ChatRequest(BaseModel):
    """The body of a chat request; the engine itself checks ``text``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    conversation_id: Id
    user_id: Id
    text: str
    message_id: Id | None = None


class WebAdapter:
    """Serves a bot over HTTP; see the module docstring for the routes."""

    channel = CHANNEL

    def __init__(self, settings: BotSettings, section: Mapping[str, Any]) -> None:
        self.settings = settings
        self.config = adapter_settings(WebSettings, settings, section, CHANNEL)
        self._runner: web.AppRunner | None = None
        self._unregister: Callable[[], None] | None = None
        self._stopped = asyncio.Event()
        self._mounted: list[web.RouteDef] = []

    @property
    def port(self) -> int:
        """The port the adapter listens on (the one picked, if configured as 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the web adapter is not started")
        return int(self._runner.addresses[0][1])

    def mount(self, routes: Sequence[web.RouteDef]) -> None:
        """Serve other adapters' ``routes`` (a Telegram webhook) too, from the next start."""
        self._mounted.extend(routes)

    def listen_addresses(self) -> list[ListenAddress]:
        """Where :meth:`start` will listen (checked before the engine starts)."""
        return [ListenAddress(self.config.host, self.config.port, "adapters.web")]

    async def start(self, engine: Engine) -> None:
        """Listen on the configured host and port; returns once serving."""
        if self._runner is not None:
            return
        self._stopped.clear()
        page = await asyncio.to_thread(files("bots.web").joinpath("static/index.html").read_bytes)
        runner = web.AppRunner(
            build_app(engine, self.config, page, self._mounted),
            # Cancel a request's handler when its client goes, so its generation stops.
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            access_log_class=AccessLog,
            # None: aiohttp makes no line at all (not even the logger's level check).
            access_log=access_logger if self.config.access_log else None,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.config.host, self.config.port,
                              reuse_port=self.config.reuse_port or None).start()
        except BaseException as exc:
            await runner.cleanup()
            if isinstance(exc, OSError):
                raise ConfigError(
                    f"{self.settings.source}: adapters.web: cannot listen on "
                    f"{self.config.host}:{self.config.port}: {exc.strerror or exc}"
                ) from exc
            raise
        self._runner = runner
        # Plugins' own messages (a handoff agent's answer) go through the widget's hub.
        hub = runner.app[routes.HUB]
        undo = [engine.plugins.services.outbox.register(CHANNEL, hub.deliver),
                engine.plugins.services.forgetting.register("adapters.web", hub.forget_user)]

        def unregister() -> None:
            for step in undo:
                step()

        self._unregister = unregister
        log.info("bot %s: web adapter on http://%s:%d/", engine.name, self.config.host, self.port)

    def user_data(self) -> WidgetStores | None:
        """The widget's reply logs and feedback, for ``parley forget`` (None when they
        live in this process: with the embedded memory backend)."""
        stores = WidgetStores(self.settings, self.config)
        return stores if stores.out_of_process else None

    def feedback_source(self) -> WidgetStores | None:
        """The widget's ratings, for ``parley feedback`` (None when they live in this
        process: with the embedded memory backend)."""
        return self.user_data()

    async def stop(self) -> None:
        """Stop listening; replies in progress get a few seconds to finish. Idempotent."""
        runner, self._runner = self._runner, None
        unregister, self._unregister = self._unregister, None
        if unregister is not None:
            unregister()
        try:
            if runner is not None:
                await runner.cleanup()
        finally:
            self._stopped.set()

    async def wait(self) -> None:
        """Return only once the adapter is stopped: a web server never ends by itself."""
        await self._stopped.wait()


def build_app(
    engine: Engine, config: WebSettings, page: bytes, mounted: Sequence[web.RouteDef] = ()
) -> web.Application:
    """The aiohttp application serving ``engine``, with ``page`` as the demo page and
    the ``mounted`` routes of other adapters."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[json_errors])
    app[ENGINE] = engine
    app[CONFIG] = config
    app[KEYS] = ApiKeys(config.api_keys)
    app[PAGE] = page
    app[SOCKETS] = weakref.WeakSet()
    app.on_response_prepare.append(add_headers)
    app.on_shutdown.append(close_sockets)
    routes.install(app, engine, config)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    for path, handler in (("/api/v1/chat", _chat), ("/api/v1/chat/stream", _chat_stream)):
        app.router.add_post(path, handler)
        app.router.add_route("OPTIONS", path, preflight)
    app.router.add_get("/api/v1/chat/messages", _messages)
    app.router.add_routes(mounted)
    for route in engine.plugins.routes:
        app.router.add_route(route.method, route.path, _plugin_route(route.handler))
    return app


def _plugin_route(handler: RouteHandler) -> Handler:
    """A plugin's route behind the API keys of /api/v1/chat."""

    async def serve(request: web.Request) -> web.StreamResponse:
        with _caller(request) as tenant:
            return await handler(request, Caller(request.app[ENGINE], tenant))

    return serve


_NO_TENANT = nullcontext(None)  # without keys: cheaper than entering a generator


def _caller(request: web.Request) -> AbstractContextManager[str | None]:
    """The tenant of the request's API key while it runs (None without keys configured);
    401 for a missing or wrong key, 429 when the key has too many requests running."""
    keys = request.app[KEYS]
    return _keyed(request, keys) if keys else _NO_TENANT


@contextmanager
def _keyed(request: web.Request, keys: ApiKeys) -> Iterator[str | None]:
    try:
        key = keys.caller(request.headers.get("Authorization"))
    except Unauthorized as exc:
        raise Refused(401, str(exc), "unauthorized") from None
    try:
        with keys.running(key):
            yield key.tenant
    except KeyBusy:
        raise Refused(429, "too many requests are running for this API key",
                       "slow_down") from None


async def _chat(request: web.Request) -> web.StreamResponse:
    with _caller(request) as tenant:
        message = await _read_message(request, tenant)
        return _json_reply(await collect(request.app[ENGINE].handle(message)), message)


async def _chat_stream(request: web.Request) -> web.StreamResponse:
    with _caller(request) as tenant:
        return await _stream_reply(request, await _read_message(request, tenant))


async def _stream_reply(request: web.Request, message: IncomingMessage) -> web.StreamResponse:
    async with closing(request.app[ENGINE].handle(message)) as events:
        # The open request is the typing indicator; holding the response until the reply
        # begins lets a failure before it (busy, memory down) be a status, as on /chat,
        # unless the wait is long enough for keep-alive comments to have started it.
        first, response = await sse.first_event(
            request, events, request.app[CONFIG].keepalive)
        if first.kind is ReplyKind.ERROR and response is None:
            return _json_reply(first, message)
        if response is None:
            response = await sse.start_stream(request)
        await response.write(_sse(first, message))
        try:
            async for event in events:
                if event.kind is not ReplyKind.TYPING:
                    await response.write(_sse(event, message))
        except ConnectionError:
            raise  # the client went; leaving the block closes the engine's stream
        except Exception:
            log.exception("web: reply to %s failed mid-stream", message.key)
            failed = ReplyEvent(ReplyKind.ERROR, request.app[ENGINE].apologies.internal,
                                code="internal")
            await response.write(_sse(failed, message))
        await response.write_eof()
    return response


async def _messages(request: web.Request) -> web.StreamResponse:
    """What plugins sent into a conversation (e.g. a handoff agent's answers), after
    ``after``: ``{"messages": [{"seq", "message_id", "text", "at"}], "last", "gap"}``.
    Kept as long as the widget's reply events (``resume_ttl``, ``resume_events``)."""
    with _caller(request) as tenant:
        try:
            fields = _Poll.model_validate({
                "conversation_id": request.query.get("conversation_id", ""),
                "after": int(request.query.get("after", "0"))})
        except (ValidationError, ValueError):
            raise Refused(400, "give conversation_id and after (a number >= 0)") from None
        scope = f"{tenant}:" if tenant else ""
        ref = ref_of(scope + fields.conversation_id)
        try:
            backlog = await request.app[routes.HUB].log.since(ref, fields.after)
        except StoreUnavailable:
            raise Refused(503, "the conversation's messages cannot be read now",
                           "unavailable") from None
        messages = [{k: e[k] for k in ("seq", "message_id", "text", "at") if k in e}
                    for e in backlog.entries if e["kind"] == "message"]
        return web.json_response({"messages": messages, "last": backlog.last,
                                  "gap": backlog.gap})


class _Poll(BaseModel):
    """The query of ``GET /api/v1/chat/messages``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    conversation_id: Id
    after: int = Field(default=0, ge=0)


async def _read_message(request: web.Request, tenant: str | None = None) -> IncomingMessage:
    """The request's message, or an HTTP error saying why it is refused; with a key's
    ``tenant``, its ids are the tenant's."""
    limit = request.app[CONFIG].max_body_bytes
    # Insisting on JSON also means a cross-site page cannot post without a CORS preflight.
    charset = (request.charset or "utf-8").lower()
    if request.content_type != "application/json" or charset not in ("utf-8", "utf8"):
        raise Refused(415, "the body must be JSON in UTF-8 (Content-Type: application/json)",
                     "unsupported_media_type")
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    try:
        data = jsoncodec.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise Refused(400, "the body is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise Refused(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Refused(400, "the body must be a JSON object")
    try:
        fields = ChatRequest.model_validate(data)
    except ValidationError as exc:
        problems = (".".join(map(str, e["loc"])) + ": " + e["msg"] for e in exc.errors())
        raise Refused(400, "; ".join(problems)) from None
    scope = f"{tenant}:" if tenant else ""
    return IncomingMessage(
        bot=request.app[ENGINE].name,
        channel=CHANNEL,
        conversation_id=scope + fields.conversation_id,
        user_id=scope + fields.user_id,
        message_id=fields.message_id or uuid.uuid4().hex,
        text=fields.text,
        metadata={"tenant": tenant} if tenant else {},
    )


def _too_large(limit: int) -> Refused:
    return Refused(413, f"the body must be at most {limit} bytes", "payload_too_large")


def _reply_body(event: ReplyEvent, message: IncomingMessage) -> dict[str, str]:
    body = {
        "kind": event.kind.value,
        "text": event.text,
        "action": str(event.action),
        # As the caller named it, without its key's tenant.
        "conversation_id": message.conversation_id.removeprefix(
            f"{message.metadata['tenant']}:" if "tenant" in message.metadata else ""),
        "message_id": message.message_id,
    }
    if event.code is not None:
        body["code"] = event.code
    return body


def _json_reply(event: ReplyEvent, message: IncomingMessage) -> web.Response:
    # The body made as bytes: web.json_response's str, then its encoding, cost 1.3 µs more
    # a reply; the Content-Type is the same (application/json; charset=utf-8).
    if event.kind is not ReplyKind.ERROR:
        return web.Response(body=jsoncodec.dumpb(_reply_body(event, message)),
                            content_type="application/json", charset="utf-8")
    status = _ERROR_STATUS.get(event.code or "", 500)
    if status == 400:
        return error_response(400, event.text, event.code or "bad_request")
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else None
    return web.Response(body=jsoncodec.dumpb(_reply_body(event, message)), status=status,
                        headers=headers, content_type="application/json", charset="utf-8")


def _sse(event: ReplyEvent, message: IncomingMessage) -> bytes:
    data = jsoncodec.dumps(_reply_body(event, message))
    return f"event: {event.kind.value}\ndata: {data}\n\n".encode()

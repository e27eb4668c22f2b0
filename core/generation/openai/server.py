"""An OpenAI-compatible HTTP API over any :class:`Generator`, for games and tools.

Routes:

- ``POST /v1/chat/completions``: OpenAI's request shape; ``stream: true`` answers with
  Server-Sent Events of ``chat.completion.chunk`` objects ending in ``data: [DONE]``,
  otherwise one ``chat.completion`` object. Usage is left out: the generator reports
  text, not tokens, and a guessed count would be worse than none.
- ``GET /v1/models`` (and ``/v1/models/{id}``): the one model served.
- ``GET /healthz``; ``GET /readyz`` (ready to take requests, or why not); ``GET /metrics``
  when the owner gives a renderer.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``. A busy
generator is a 429 with ``Retry-After``. The answer's headers wait for its first piece,
so a failure before it is a status too; a failure later is an ``error`` chunk.

The owner of the generator starts and stops it, and serves the app on an ``AppRunner``
made with ``handler_cancellation=True``, so that a client hanging up cancels its
generation even before the first piece is written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from core.api_keys import ApiKeys, KeyBusy, Unauthorized
from core.errors import GenerationError, GeneratorBusy
from core.generation.base import (
    ChatMessage,
    FinishReason,
    GenerationRequest,
    Generator,
    SamplingParams,
    TokenDelta,
    readiness_of,
)
from core.generation.openai.penalties import penalty_for_presence
from core.streams import closing
from core.types import Role

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
DEFAULT_MAX_TOKENS = 512
MAX_TOKENS = 8192
RETRY_AFTER_SECONDS = 2
DEFAULT_TENANT = "openai-api"
_ROLES: dict[str, Role] = {
    "system": "system", "developer": "system", "user": "user", "assistant": "assistant",
}


def _text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "surrogate", "must be valid Unicode (no lone surrogates)"
        ) from None
    return value


def _content(value: object) -> object:
    """A message's content as one string: a string, or a list of text parts joined."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise PydanticCustomError(
                "content_part", "only parts of type 'text' are supported"
            )
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise PydanticCustomError(
                "content_part", "a text part is {\"type\": \"text\", \"text\": string}"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _stops(value: object) -> object:
    return [value] if isinstance(value, str) else value


Text = Annotated[str, AfterValidator(_text)]
Stop = Annotated[str, Field(min_length=1), AfterValidator(_text)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class MessageIn(_Strict):
    """One message of the chat, as OpenAI clients send it."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Text, BeforeValidator(_content)]
    name: Text | None = None  # accepted, not used


class StreamOptions(_Strict):
    """``stream_options``; usage is never sent, so asking for it changes nothing."""

    include_usage: bool | None = None


class CompletionIn(_Strict):
    """The body of ``POST /v1/chat/completions``: the parameters Parley can honour."""

    model: Annotated[Text, Field(min_length=1, max_length=256)]
    messages: Annotated[list[MessageIn], Field(min_length=1, max_length=1000)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    stop: Annotated[list[Stop], Field(max_length=16), BeforeValidator(_stops)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Annotated[Text, Field(max_length=256)] | None = None
    # Accepted at the values that mean "off", since some clients always send them.
    n: Literal[1] | None = None
    frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] | None = None
    # Repetition control on the reply's own tokens: OpenAI's presence_penalty (read back
    # as the multiplicative penalty the openai backend mapped it from), or the
    # repetition_penalty field of vLLM, TGI and llama.cpp. Unset: the model's default.
    presence_penalty: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(ge=1.0, le=3.0)] | None = None
    # As on the local backend (0: off); the openai backend sends it when asked to.
    no_repeat_ngram_size: Annotated[int, Field(ge=0, le=32)] | None = None

    def sampling(self) -> SamplingParams:
        """The sampling settings, with OpenAI's defaults where the request says nothing."""
        penalty = self.repetition_penalty
        if penalty is None and self.presence_penalty:
            penalty = penalty_for_presence(self.presence_penalty)
        return SamplingParams(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            repetition_penalty=penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
        )


class OpenAIError(Exception):
    """A request answered with an OpenAI-shaped error instead of a completion."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status, message, kind, param, code
        )

    def body(self) -> dict[str, dict[str, str | None]]:
        """The JSON of the error."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> web.Response:
        """The error as an HTTP response."""
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if self.status == 429 else None
        return web.json_response(self.body(), status=self.status, headers=headers)


GENERATOR = web.AppKey("openai_generator", Generator)
MODEL = web.AppKey("openai_model", str)
KEYS = web.AppKey("openai_keys", ApiKeys)
METRICS: web.AppKey[Callable[[], bytes]] = web.AppKey("openai_metrics")


def openai_app(
    generator: Generator,
    model_name: str,
    *,
    metrics_render: Callable[[], bytes] | None = None,
    keys: ApiKeys | None = None,
) -> web.Application:
    """The API serving ``generator`` as model ``model_name``; see the module docstring.

    With ``keys``, every completion needs ``Authorization: Bearer KEY``: the key's tenant
    is the request's tenant (the fair queue's unit), users are kept apart per key, and a
    key has at most its ``max_in_flight`` requests running (429 beyond). Without keys
    (loopback only) every request is tenant ``openai-api``. A tenant is never taken from
    a header.
    """
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_openai_errors])
    app[GENERATOR] = generator
    app[MODEL] = model_name
    app[KEYS] = keys or ApiKeys(())
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model:.+}", _model)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    if metrics_render is not None:
        app[METRICS] = metrics_render
        app.router.add_get("/metrics", _metrics)
    return app


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    keys = request.app[KEYS]
    if not keys:
        return await _complete(request, DEFAULT_TENANT, None)
    try:
        key = keys.caller(request.headers.get("Authorization"))
        with keys.running(key):
            return await _complete(request, key.tenant, key.tenant)
    except Unauthorized as exc:
        raise OpenAIError(401, str(exc), kind="invalid_request_error",
                          code="invalid_api_key") from None
    except KeyBusy:
        raise OpenAIError(429, "Too many requests are running for this API key; retry "
                               "shortly", kind="rate_limit_error",
                          code="rate_limit_exceeded") from None


async def _complete(
    request: web.Request, tenant: str, namespace: str | None
) -> web.StreamResponse:
    fields = await _read_request(request)
    model = request.app[MODEL]
    if fields.model != model:
        raise OpenAIError(404, f"The model `{fields.model}` does not exist; this server has "
                               f"`{model}`", param="model", code="model_not_found")
    user = fields.user or ""
    if namespace is not None:
        # Per-user caps apply per key: one client's users never share another's.
        user = f"{namespace}:{user}"
    job = GenerationRequest(
        messages=tuple(ChatMessage(_ROLES[m.role], m.content) for m in fields.messages),
        sampling=fields.sampling(),
        tenant=tenant,
        user=user,
    )
    chunk = _Chunks(f"chatcmpl-{job.request_id}", model)
    async with closing(request.app[GENERATOR].stream(job)) as deltas:
        first = await _next(deltas)  # before any header: a failure here is a status
        if not fields.stream:
            return await _whole(first, deltas, chunk)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        })
        await response.prepare(request)
        await response.write(chunk.sse({"role": "assistant", "content": ""}))
        try:
            await _stream(first, deltas, chunk, response)
        except OpenAIError as exc:
            await response.write(_data(exc.body()))
        except ConnectionError:
            raise  # the client went; leaving the block closes the generator's stream
        except Exception:
            log.exception("openai api: answer %s failed mid-stream", chunk.id)
            error = OpenAIError(500, "internal error", kind="server_error")
            await response.write(_data(error.body()))
        await response.write_eof()
        return response


async def _stream(
    delta: TokenDelta | None,
    deltas: AsyncIterator[TokenDelta],
    chunk: _Chunks,
    response: web.StreamResponse,
) -> None:
    """Write the answer's chunks; raises :class:`OpenAIError` for an error chunk."""
    shown = False
    while delta is not None:
        if delta.restart and shown:
            raise OpenAIError(500, "the generation was restarted after part of it was sent",
                              kind="server_error", code="generation_restarted")
        if delta.text:
            await response.write(chunk.sse({"content": delta.text}))
            shown = True
        if delta.finish_reason is not None:
            await response.write(chunk.sse({}, _finish(delta.finish_reason)) + b"data: [DONE]\n\n")
            return
        delta = await _next(deltas)
    await response.write(chunk.sse({}, "stop") + b"data: [DONE]\n\n")


async def _whole(
    delta: TokenDelta | None, deltas: AsyncIterator[TokenDelta], chunk: _Chunks
) -> web.Response:
    pieces: list[str] = []
    reason: FinishReason = "stop"
    while delta is not None:
        if delta.restart:
            pieces.clear()
        pieces.append(delta.text)
        if delta.finish_reason is not None:
            reason = delta.finish_reason
            break
        delta = await _next(deltas)
    message = {"role": "assistant", "content": "".join(pieces)}
    return web.json_response({
        **chunk.head("chat.completion"),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _finish(reason)}],
    })


async def _next(deltas: AsyncIterator[TokenDelta]) -> TokenDelta | None:
    """The next delta, None at the end; generator failures become OpenAI errors."""
    try:
        return await anext(deltas)
    except StopAsyncIteration:
        return None
    except GeneratorBusy as exc:
        raise OpenAIError(429, f"the generator is busy: {exc}", kind="rate_limit_error",
                          code="overloaded") from None
    except GenerationError as exc:
        log.warning("openai api: generation failed: %s", exc)
        raise OpenAIError(500, f"generation failed: {exc}", kind="server_error",
                          code="generation_failed") from None


def _finish(reason: FinishReason) -> str:
    if reason in ("cancelled", "error"):
        raise OpenAIError(500, f"generation ended with {reason!r}", kind="server_error",
                          code="generation_failed")
    return reason


class _Chunks:
    """Builds the objects of one answer, which share an id, a time and a model."""

    def __init__(self, completion_id: str, model: str) -> None:
        self.id, self.model, self.created = completion_id, model, int(time.time())

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def sse(self, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        return _data({
            **self.head("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}],
        })


def _data(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


async def _read_request(request: web.Request) -> CompletionIn:
    """The validated body, or an :class:`OpenAIError` saying why it is refused."""
    charset = (request.charset or "utf-8").lower()
    if request.content_type != "application/json" or charset not in ("utf-8", "utf8"):
        raise OpenAIError(415, "the body must be JSON in UTF-8 (Content-Type: application/json)",
                          code="unsupported_media_type")
    too_large = OpenAIError(413, f"the body must be at most {MAX_BODY_BYTES} bytes",
                            code="payload_too_large")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    body = b""  # read here, not with request.read(): the cap holds wherever we are mounted
    while chunk := await request.content.read(64 * 1024):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise OpenAIError(400, "the body is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise OpenAIError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    if isinstance(data.get("messages"), list):
        for i, message in enumerate(data["messages"]):
            role = message.get("role") if isinstance(message, dict) else None
            if isinstance(role, str) and role not in _ROLES:
                raise OpenAIError(400, f"messages[{i}].role: role {role!r} is not supported "
                                       f"(only system, developer, user and assistant)",
                                  param=f"messages[{i}].role")
    try:
        return CompletionIn.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _param(error["loc"])
        message = f"{param}: {error['msg']}" if param else error["msg"]
        if len(exc.errors()) > 1:
            message += f" (and {len(exc.errors()) - 1} more problems)"
        raise OpenAIError(400, message, param=param) from None


def _param(loc: tuple[int | str, ...]) -> str | None:
    """``("messages", 0, "content")`` as ``messages[0].content``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path or None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_object(request)]})


async def _model(request: web.Request) -> web.Response:
    if request.match_info["model"] != request.app[MODEL]:
        raise OpenAIError(404, f"The model `{request.match_info['model']}` does not exist",
                          param="model", code="model_not_found")
    return web.json_response(_model_object(request))


def _model_object(request: web.Request) -> dict[str, Any]:
    return {"id": request.app[MODEL], "object": "model", "created": 0, "owned_by": "parley"}


async def _healthz(request: web.Request) -> web.Response:
    # A ServiceBase says whether it is started; another generator is taken at its word.
    started = getattr(request.app[GENERATOR], "started", True)
    state = readiness_of(request.app[GENERATOR])
    if not state.healthy:
        return web.json_response({"status": "unhealthy", "model": request.app[MODEL],
                                  "reason": state.reason}, status=503)
    return web.json_response({"status": "ok" if started else "starting",
                              "model": request.app[MODEL]}, status=200 if started else 503)


async def _readyz(request: web.Request) -> web.Response:
    state = readiness_of(request.app[GENERATOR])
    body = {"status": "ready" if state.ready else "not ready", "model": request.app[MODEL]}
    if not state.ready:
        body["reason"] = state.reason
    return web.json_response(body, status=200 if state.ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS](), headers={"Content-Type": CONTENT_TYPE_LATEST})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error of the API in OpenAI's shape: refusals, unknown routes, bugs."""
    try:
        return await handler(request)
    except OpenAIError as exc:
        return exc.response()
    except ConnectionError:
        raise  # the client hung up: nobody to answer
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = OpenAIError(exc.status, exc.reason, code=exc.reason.lower().replace(" ", "_"))
        response = error.response()
        response.headers.extend((k, v) for k, v in exc.headers.items() if k == "Allow")
        return response
    except Exception:
        log.exception("openai api: %s %s failed", request.method, request.path)
        return OpenAIError(500, "internal error", kind="server_error").response()

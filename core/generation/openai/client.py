"""The ``openai`` backend: any OpenAI-compatible chat server as the generator, streaming.

vLLM, TGI, the llama.cpp server, a hosted API, or another Parley's ``parley worker``:
``POST {generation.url}/chat/completions`` with ``stream: true``, and the Server-Sent
Events of the answer turned into :class:`TokenDelta` s as they arrive.

Time limits: ``generation.timeout`` bounds the wait from sending the request to the
first event of the answer (and, after that, any silence between two reads); the whole
answer must arrive within ``total_timeout``. Closing the stream early closes the HTTP
connection, which is how the server learns that nobody is listening any more.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from core.config import BotSettings, GenerationSection
from core.errors import ConfigError, GenerationError, GeneratorBusy
from core.generation.base import FinishReason, GenerationRequest, TokenDelta, backend_settings
from core.generation.openai.settings import OpenAISettings
from core.lifecycle import ServiceBase

log = logging.getLogger(__name__)

# The longest an answer may take from request to last event, whatever its pace.
TOTAL_TIMEOUT = 600.0
# What is kept of a server's error message in ours.
MAX_ERROR_CHARS = 300
# An event (or a JSON answer) bigger than this is not a chat chunk.
MAX_EVENT_BYTES = 1024 * 1024
# How long the rest of a finished answer may take to arrive before the connection is
# dropped rather than kept for the next request.
WIND_DOWN_SECONDS = 1.0
_BUSY_STATUS = frozenset({429, 503})
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


class SSEDecoder:
    """Splits a Server-Sent Events byte stream into the ``data`` of its events.

    Follows the EventSource rules that matter here: lines end in LF, CR LF or CR;
    ``:`` starts a comment (a keep-alive); a ``data`` field may span several lines,
    joined by LF; a blank line ends an event; other fields (``event``, ``id``,
    ``retry``) are ignored, except that the ``event`` name is kept for errors.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._size = 0
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """The ``(event name, data)`` of each event that ``chunk`` completes."""
        self._buffer += chunk
        events: list[tuple[str, str]] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                break
            end, after = cut
            line, self._buffer = self._buffer[:end], self._buffer[after:]
            event = self._line(line)
            if event is not None:
                events.append(event)
        if len(self._buffer) + self._size > self._max:
            raise GenerationError(f"the server sent an event over {self._max} bytes")
        return events

    def close(self) -> list[tuple[str, str]]:
        """What a stream that ended without a final blank line still completes."""
        events = self.feed(b"\n") if self._buffer else []
        event = self._line(b"")
        return [*events, event] if event is not None else events

    def _line(self, raw: bytes) -> tuple[str, str] | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GenerationError("the server sent an event that is not UTF-8") from None
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = (self._event, "\n".join(self._data))
            self._data, self._event, self._size = [], "", 0
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
            self._size += len(raw)
        elif name == "event":
            self._event = value
        return None


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """Where the first line of ``buffer`` ends, and where the next one starts."""
    lf, cr = buffer.find(b"\n"), buffer.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return (lf, lf + 1) if lf != -1 else None
    if cr == len(buffer) - 1:
        return None  # a CR LF may be split across chunks: wait for the next byte
    return (cr, cr + 2) if buffer[cr + 1 : cr + 2] == b"\n" else (cr, cr + 1)


class OpenAIGenerator(ServiceBase):
    """Streams chat completions from an OpenAI-compatible server at ``generation.url``."""

    def __init__(self, settings: BotSettings, *, total_timeout: float = TOTAL_TIMEOUT) -> None:
        section: GenerationSection = settings.generation
        self.options = backend_settings(section, OpenAISettings, source=settings.source)
        url = (self.options.url or "").rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"{settings.source}: generation.url: the openai backend needs the server's "
                f"base URL, e.g. \"http://127.0.0.1:8000/v1\" (got {self.options.url!r})"
            )
        self.settings = section
        self.endpoint = f"{url}/chat/completions"
        self.total_timeout = total_timeout
        self._session: aiohttp.ClientSession | None = None

    async def _start(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.settings.timeout, sock_read=self.settings.timeout
        )
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def _stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _headers(self, request: GenerationRequest) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        if request.tenant:
            headers["X-Parley-Tenant"] = request.tenant
        return headers

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self.settings.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": True,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if request.user:
            # Enough for the server to tell users apart (fairness, abuse reports) without
            # handing a platform's user id to a third party.
            who = f"{request.tenant}\0{request.user}".encode()
            body["user"] = hashlib.sha256(who).hexdigest()[:32]
        return body

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """The server's answer to ``request``, piece by piece; closing it hangs up."""
        session = self._session
        if session is None or not self.started:
            raise GenerationError("the openai generator is not started")
        deadline = asyncio.get_running_loop().time() + self.total_timeout
        response: aiohttp.ClientResponse | None = None
        reusable = False
        try:
            try:
                async with asyncio.timeout(min(self.settings.timeout, self.total_timeout)):
                    response = await session.post(
                        self.endpoint, json=self._body(request), headers=self._headers(request)
                    )
                    if response.status >= 400:
                        raise await _http_error(response)
                    if response.content_type == "application/json":
                        # A server that ignores ``stream`` answers with one object.
                        whole = _completion(await _read(response, MAX_EVENT_BYTES))
                    else:
                        events = _EventReader(response)
                        event = await events.next()
            except aiohttp.ConnectionTimeoutError:
                raise GenerationError(
                    f"cannot connect to {self.endpoint}: timed out"
                ) from None
            except TimeoutError:
                raise GeneratorBusy(
                    f"no answer from {self.endpoint} within {self.settings.timeout:g} s"
                ) from None
            if response.content_type == "application/json":
                reusable = True
                yield whole
                return
            while event is not None:
                if event[1].strip() == "[DONE]":
                    yield TokenDelta("", finish_reason="stop")  # ended without a reason
                    reusable = await events.read_to_end()
                    return
                delta = _chunk(*event)
                if delta is not None:
                    yield delta
                    if delta.finish_reason is not None:
                        reusable = await events.read_to_end()
                        return
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await events.next()
                except aiohttp.ServerTimeoutError:
                    raise GenerationError(
                        f"{self.endpoint} went silent for {self.settings.timeout:g} s"
                    ) from None
                except TimeoutError:
                    raise GenerationError(
                        f"the answer from {self.endpoint} took over {self.total_timeout:g} s"
                    ) from None
            raise GenerationError(f"{self.endpoint} ended the stream before the answer ended")
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or exc.os_error
            raise GenerationError(f"cannot connect to {self.endpoint}: {reason}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GenerationError(
                f"connection to {self.endpoint} failed: {str(exc) or type(exc).__name__}"
            ) from None
        finally:
            if response is not None:
                # An answer read to its end leaves a connection to reuse; an unfinished one
                # is closed, which is how the server learns that nobody is listening.
                if reusable:
                    response.release()
                else:
                    response.close()


class _EventReader:
    """The events of a streamed response, one at a time."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._content = response.content
        self._decoder = SSEDecoder()
        self._ready: list[tuple[str, str]] = []
        self._ended = False

    async def next(self) -> tuple[str, str] | None:
        """The next ``(event name, data)``; None once the stream has ended."""
        while not self._ready and not self._ended:
            chunk = await self._content.readany()
            if chunk:
                self._ready = self._decoder.feed(chunk)
            else:
                self._ended = True
                self._ready = self._decoder.close()
        return self._ready.pop(0) if self._ready else None

    async def read_to_end(self) -> bool:
        """Skip what follows the answer's end (``[DONE]``, usage); True if the body ended."""
        try:
            async with asyncio.timeout(WIND_DOWN_SECONDS):
                while await self.next() is not None:
                    pass
        except (TimeoutError, aiohttp.ClientError, GenerationError):
            return False
        return True


async def _read(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body of ``response``, or its first ``limit`` bytes."""
    body = b""
    while len(body) < limit and (chunk := await response.content.readany()):
        body += chunk
    return body[:limit]


def _chunk(name: str, data: str) -> TokenDelta | None:
    """The delta a ``chat.completion.chunk`` event carries, if any; raises on nonsense."""
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError):
        raise GenerationError(f"the server sent a chunk that is not JSON: {_cut(data)}") from None
    if not isinstance(chunk, dict):
        raise GenerationError(f"the server sent a chunk that is not an object: {_cut(data)}")
    if name == "error" or "error" in chunk:
        raise GenerationError(f"the server failed mid-answer: {_error_message(chunk)}")
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise GenerationError(f"the server sent a chunk without choices: {_cut(data)}")
    for choice in choices:  # only choice 0 is asked for; a usage chunk has none
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        reason = choice.get("finish_reason")
        if not isinstance(delta, dict) or not isinstance(content, str | None) or not (
            reason is None or isinstance(reason, str)
        ):
            raise GenerationError(f"the server sent a malformed chunk: {_cut(data)}")
        if content or reason is not None:
            return TokenDelta(content or "", finish_reason=_finish(reason))
    return None


def _completion(body: bytes) -> TokenDelta:
    """The one delta of a whole ``chat.completion`` object (a server that ignored ``stream``)."""
    try:
        answer = json.loads(body.decode("utf-8"))
        choice = answer["choices"][0]
        content = choice["message"].get("content") or ""
        reason = choice.get("finish_reason") or "stop"
        if not isinstance(content, str) or not isinstance(reason, str):
            raise TypeError
    except (ValueError, RecursionError, LookupError, TypeError, AttributeError):
        raise GenerationError(f"the server sent a malformed answer: {_cut(body)}") from None
    return TokenDelta(content, finish_reason=_finish(reason))


def _finish(reason: str | None) -> FinishReason | None:
    # tool_calls, content_filter, function_call, eos...: the answer ended all the same.
    return None if reason is None else _FINISH.get(reason, "stop")


async def _http_error(response: aiohttp.ClientResponse) -> GenerationError:
    try:
        body = await _read(response, 64 * 1024)
    except aiohttp.ClientError:
        body = b""
    try:
        parsed: Any = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        parsed = None
    message = _error_message(parsed) if isinstance(parsed, dict) else _cut(body)
    text = f"{response.url} answered HTTP {response.status}: {message or response.reason}"
    return GeneratorBusy(text) if response.status in _BUSY_STATUS else GenerationError(text)


def _error_message(body: dict[str, Any]) -> str:
    """The message of an OpenAI-style error object (or of the shapes others use)."""
    error = body.get("error", body.get("detail", body.get("message", body)))
    if isinstance(error, dict):
        error = error.get("message", error)
    return _cut(error if isinstance(error, str) else json.dumps(error))


def _cut(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def create(settings: BotSettings) -> OpenAIGenerator:
    """Entry point ``parley.generators: openai``."""
    return OpenAIGenerator(settings)

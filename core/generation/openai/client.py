"""The ``openai`` backend: any OpenAI-compatible chat server as the generator, streaming.

vLLM, TGI, the llama.cpp server, a hosted API, or another Parley's ``parley worker``,
called through the official ``openai`` SDK (``pip install 'parley[openai]'``): it parses
the Server-Sent Events, retries refused connections, timeouts, 429 and 5xx answers
(after the server's ``Retry-After`` when it sends one) and applies the connect and read
timeouts. What is Parley's own:

- time limits: the wait for the first piece of the answer, retries included, is bounded
  by ``generation.timeout`` (past it the server is busy); the whole answer by
  ``total_timeout``;
- the bot's sampling settings, mapped onto the request (:func:`sampling_arguments`), and
  chat-shaped endings (``finish_sentence``, ``max_sentences``) applied to the streamed
  text as the local backend applies them to its tokens;
- closing the stream early closes the HTTP connection, which is how the server learns
  that nobody is listening any more; a finished answer leaves it for the next request;
- every failure is a :class:`GenerationError` (``GeneratorBusy`` when the server is busy)
  with the server's own message, so the engine can apologise.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from core.config import BotSettings, GenerationSection
from core.errors import ConfigError, GenerationError, GeneratorBusy
from core.generation.base import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
    backend_settings,
)
from core.generation.openai.penalties import presence_for_penalty
from core.generation.openai.settings import OpenAISettings
from core.generation.reply_shape import SentenceEnds, reply_limits
from core.lifecycle import ServiceBase

if TYPE_CHECKING:
    from openai import AsyncOpenAI

log = logging.getLogger(__name__)

# What is kept of a server's error message in ours.
MAX_ERROR_CHARS = 300
# A JSON answer (from a server that ignores ``stream``) bigger than this is not a chat answer.
MAX_ANSWER_BYTES = 1024 * 1024
# How long the rest of a finished answer may take to arrive before the connection is
# dropped rather than kept for the next request.
WIND_DOWN_SECONDS = 1.0
_BUSY_STATUS = frozenset({429, 503})
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


def sampling_arguments(sampling: SamplingParams, repetition: str,
                       no_repeat_ngram: str = "off") -> dict[str, Any]:
    """The request fields for ``sampling``: ``max_tokens`` (with the quarter a reply may
    run over to finish its sentence), ``temperature``, ``top_p``, ``stop``, ``seed``, the
    repetition penalty as ``repetition`` says and ``no_repeat_ngram_size`` as
    ``no_repeat_ngram`` says (see :class:`OpenAISettings`).
    """
    limit, _ = reply_limits(sampling)
    fields: dict[str, Any] = {
        "max_tokens": limit, "temperature": sampling.temperature, "top_p": sampling.top_p,
    }
    if sampling.stop:
        fields["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    penalty = sampling.repetition_penalty
    if penalty is not None and penalty != 1.0 and not sampling.ignore_eos:
        if repetition == "presence_penalty":
            fields["presence_penalty"] = presence_for_penalty(penalty)
        elif repetition == "repetition_penalty":
            fields["repetition_penalty"] = penalty
    ngram = sampling.no_repeat_ngram_size
    if ngram and not sampling.ignore_eos:
        if no_repeat_ngram == "no_repeat_ngram_size":
            fields["no_repeat_ngram_size"] = ngram
        elif no_repeat_ngram == "vllm_xargs":
            fields["vllm_xargs"] = {"no_repeat_ngram_size": ngram}
    return fields


# Fields of the body that are not OpenAI's: the SDK sends them as given in extra_body.
_NOT_OPENAI = ("repetition_penalty", "no_repeat_ngram_size", "vllm_xargs")


class ReplyShape:
    """``finish_sentence`` and ``max_sentences`` on streamed text: each content chunk counts
    as one token (vLLM, llama.cpp, TGI and Parley stream one token per chunk)."""

    def __init__(self, sampling: SamplingParams) -> None:
        _, self.wrap_up_at = reply_limits(sampling)
        wanted = self.wrap_up_at is not None or sampling.max_sentences is not None
        self.ends = SentenceEnds(sampling.max_sentences) if wanted else None
        self.count = 0

    def push(self, text: str) -> tuple[str, bool]:
        """The part of ``text`` to show, and whether the reply ends with it."""
        self.count += 1
        if self.ends is None:
            return text, False
        wrapping_up = self.wrap_up_at is not None and self.count >= self.wrap_up_at
        shown = self.ends.push(text, wrapping_up=wrapping_up)
        return shown, self.ends.stopped


class OpenAIGenerator(ServiceBase):
    """Streams chat completions from an OpenAI-compatible server at ``generation.url``."""

    def __init__(self, settings: BotSettings) -> None:
        section: GenerationSection = settings.generation
        self.options = backend_settings(section, OpenAISettings, source=settings.source)
        self.base_url = (self.options.url or "").rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"{settings.source}: generation.url: the openai backend needs the server's "
                f"base URL, e.g. \"http://127.0.0.1:8000/v1\" (got {self.options.url!r})"
            )
        self.settings = section
        self.endpoint = f"{self.base_url}/chat/completions"
        self._client: AsyncOpenAI | None = None
        self._omit: Any = None  # the SDK's marker for a header not to send

    async def _start(self) -> None:
        try:
            import openai
        except ImportError:
            raise GenerationError("the openai backend needs the openai package: "
                                  "pip install 'parley[openai]'") from None
        options = self.options
        read = options.read_timeout or self.settings.timeout
        # Nothing is taken from the environment: no OPENAI_API_KEY, organisation or project
        # of whoever runs the bot goes to a server the bot's file did not name.
        headers: dict[str, Any] = {"OpenAI-Organization": openai.Omit(),
                                   "OpenAI-Project": openai.Omit()}
        self._omit = openai.Omit()
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=options.api_key or "none", admin_api_key="",
            max_retries=options.max_retries,
            timeout=openai.Timeout(read, connect=options.connect_timeout),
            default_headers=headers,
        )

    async def _stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _arguments(self, request: GenerationRequest) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "model": self.settings.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": True,
            **sampling_arguments(request.sampling, self.options.repetition,
                                 self.options.no_repeat_ngram),
        }
        extra = {name: arguments.pop(name) for name in _NOT_OPENAI if name in arguments}
        if extra:
            arguments["extra_body"] = extra
        if request.user:
            # Enough for the server to tell users apart (fairness, abuse reports) without
            # handing a platform's user id to a third party.
            who = f"{request.tenant}\0{request.user}".encode()
            arguments["user"] = hashlib.sha256(who).hexdigest()[:32]
        headers: dict[str, Any] = {}
        if request.tenant:
            headers["X-Parley-Tenant"] = request.tenant
        if not self.options.api_key:
            # Without a key, no Authorization header (the SDK wants this said per request).
            headers["Authorization"] = self._omit
        arguments["extra_headers"] = headers
        return arguments

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """The server's answer to ``request``, piece by piece; closing it hangs up."""
        client = self._client
        if client is None or not self.started:
            raise GenerationError("the openai generator is not started")
        import openai

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.total_timeout
        first_by = min(deadline, loop.time() + self.settings.timeout)
        shape = ReplyShape(request.sampling)
        answer: Any = None
        try:
            try:
                async with asyncio.timeout_at(first_by):
                    answer = await client.chat.completions.create(**self._arguments(request))
                    if answer.response.headers.get("content-type", "").startswith(
                            "application/json"):
                        # A server that ignores ``stream`` answers with one object.
                        yield _completion(await answer.response.aread())
                        return
                    chunks = aiter(answer)
                    chunk = await anext(chunks, None)
            except TimeoutError:
                raise GeneratorBusy(f"no answer from {self.endpoint} within "
                                    f"{self.settings.timeout:g} s") from None
            while chunk is not None:
                delta = _delta_of(chunk)
                if delta is not None:
                    text, ended = shape.push(delta.text) if delta.text else ("", False)
                    if ended:  # the reply's last sentence: the server need not go on
                        yield TokenDelta(text.rstrip(), finish_reason="stop")
                        return
                    yield TokenDelta(text, finish_reason=delta.finish_reason)
                    if delta.finish_reason is not None:
                        await _wind_down(chunks)
                        return
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks, None)
                except TimeoutError:
                    raise GenerationError(f"the answer from {self.endpoint} took over "
                                          f"{self.options.total_timeout:g} s") from None
            raise GenerationError(f"{self.endpoint} ended the stream before the answer ended")
        except openai.APIStatusError as exc:
            text = (f"{self.endpoint} answered HTTP {exc.status_code}: "
                    f"{_error_message(exc.body) or exc.message}")
            raise (GeneratorBusy(text) if exc.status_code in _BUSY_STATUS
                   else GenerationError(text)) from None
        except openai.APITimeoutError:
            if answer is None:
                raise GeneratorBusy(f"no answer from {self.endpoint} within "
                                    f"{self.settings.timeout:g} s") from None
            read = self.options.read_timeout or self.settings.timeout
            raise GenerationError(f"{self.endpoint} went silent for {read:g} s") from None
        except openai.APIConnectionError as exc:
            reason = _cause(exc)
            if answer is None:
                raise GenerationError(f"cannot connect to {self.endpoint}: {reason}") from None
            raise GenerationError(f"connection to {self.endpoint} failed mid-answer: "
                                  f"{reason}") from None
        except openai.APIError as exc:  # an ``error`` event in the stream
            raise GenerationError(f"the server failed mid-answer: "
                                  f"{_error_message(exc.body) or _cut(exc.message)}") from None
        except UnicodeDecodeError:
            raise GenerationError("the server sent an event that is not UTF-8") from None
        except ValueError as exc:  # an event whose data is not JSON
            raise GenerationError(f"the server sent a chunk that is not JSON: {exc}") from None
        finally:
            if answer is not None:
                # Read to its end, the answer has left its connection to reuse already;
                # an unfinished one is closed, which is how the server learns that nobody
                # is listening.
                await answer.close()


async def _wind_down(chunks: AsyncIterator[Any]) -> None:
    """Read what follows the answer's end (usage, ``[DONE]``) so that the connection can
    be reused; give up after a moment (the caller then closes it)."""
    try:
        async with asyncio.timeout(WIND_DOWN_SECONDS):
            async for _ in chunks:
                pass
    except Exception:  # the answer is complete; only the reuse is lost
        log.debug("the end of an answer did not arrive cleanly; closing its connection")


def _delta_of(chunk: Any) -> TokenDelta | None:
    """The delta a ``chat.completion.chunk`` carries, if any; raises on nonsense.

    The SDK builds chunks without validating them, so the shape is checked here.
    """
    if isinstance(chunk, list | str | int | float | bool):
        raise GenerationError(f"the server sent a chunk that is not an object: {_dump(chunk)}")
    choices = getattr(chunk, "choices", None)
    if not isinstance(choices, list):
        raise GenerationError(f"the server sent a chunk without choices: {_cut(_dump(chunk))}")
    for choice in choices:  # only choice 0 is asked for; a usage chunk has none
        if getattr(choice, "index", 0) not in (0, None):
            continue
        delta = getattr(choice, "delta", None)
        content = getattr(delta, "content", None)
        reason = getattr(choice, "finish_reason", None)
        if isinstance(delta, str | int | float | list) or not isinstance(content, str | None) \
                or not isinstance(reason, str | None):
            raise GenerationError(f"the server sent a malformed chunk: {_cut(_dump(chunk))}")
        if content or reason is not None:
            return TokenDelta(content or "", finish_reason=_finish(reason))
    return None


def _dump(chunk: Any) -> str:
    to_dict = getattr(chunk, "to_dict", None)
    try:
        return json.dumps(to_dict(warnings=False) if to_dict is not None else chunk)
    except (TypeError, ValueError):
        return repr(chunk)


def _completion(body: bytes) -> TokenDelta:
    """The one delta of a whole ``chat.completion`` object (a server that ignored ``stream``)."""
    try:
        if len(body) > MAX_ANSWER_BYTES:
            raise ValueError
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


def _cause(exc: BaseException) -> str:
    """What really went wrong under the SDK's "Connection error."."""
    cause = exc.__cause__
    while cause is not None and cause.__cause__ is not None and not str(cause):
        cause = cause.__cause__
    return _cut(str(cause) or type(cause).__name__) if cause is not None else _cut(str(exc))


def _error_message(body: object) -> str:
    """The message of an OpenAI-style error object (or of the shapes others use); the SDK
    hands over the ``error`` object itself, or the body's text."""
    if isinstance(body, str):
        return _cut(body)
    if not isinstance(body, dict):
        return ""
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

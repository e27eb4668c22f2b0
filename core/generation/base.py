"""The contract between the engine and whatever produces the bot's words."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from core.config import BotSettings, GenerationSection, did_you_mean, validate_section
from core.errors import ConfigError
from core.registry import Registry
from core.types import Role

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True, slots=True, init=False)
class ChatMessage:
    """One message of the chat a request carries; the worker formats it for its model."""

    role: Role
    content: str

    def __init__(self, role: Role, content: str) -> None:
        # The dataclass's own __init__, but through the slots' descriptors (as
        # core.types' classes): a request's chat is made for every message.
        _set_role(self, role)
        _set_content(self, content)


_set_role, _set_content = (getattr(ChatMessage, name).__set__ for name in ("role", "content"))


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample; ``temperature == 0`` means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Generate exactly max_new_tokens, past end-of-turn and stop strings: for benchmarks,
    # which must compare like with like (vLLM's option of the same name).
    ignore_eos: bool = False
    # Repetition control on the reply's own tokens (never the prompt's: a reply may repeat
    # what the user said). None: the model's default (each preset has its own).
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    # Chat-shaped endings: close to max_new_tokens, end at the next sentence end instead
    # of mid-word; and end after ``max_sentences`` sentences.
    finish_sentence: bool = False
    max_sentences: int | None = None


@dataclass(frozen=True, slots=True, init=False)
class GenerationRequest:
    """A chat to continue. ``tenant`` (the bot) and ``user`` let a scheduler be fair."""

    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = SamplingParams()
    tenant: str = ""
    user: str = ""
    # 128 random bits in hex, like uuid4().hex without building a UUID (5x cheaper).
    request_id: str = field(default_factory=lambda: os.urandom(16).hex())

    def __init__(self, messages: tuple[ChatMessage, ...],
                 sampling: SamplingParams = SamplingParams(), tenant: str = "",
                 user: str = "", request_id: str | None = None) -> None:
        # The dataclass's own __init__, through the slots' descriptors (see ChatMessage).
        set_messages, set_sampling, set_tenant, set_user, set_request_id = _set_request
        set_messages(self, messages)
        set_sampling(self, sampling)
        set_tenant(self, tenant)
        set_user(self, user)
        set_request_id(self, os.urandom(16).hex() if request_id is None else request_id)


_set_request = tuple(getattr(GenerationRequest, name).__set__ for name in (
    "messages", "sampling", "tenant", "user", "request_id"))


class TokenDelta(NamedTuple):
    """A piece of generated text. The last delta of a stream has ``finish_reason`` set.

    ``restart`` marks the first delta of a new attempt (a remote job reclaimed from a
    worker that died): everything streamed before it is to be discarded.

    Immutable, as a frozen dataclass would be, but a tuple: a stream makes one per word
    or token, and a frozen dataclass's ``__init__`` cost three times as much.
    """

    text: str
    finish_reason: FinishReason | None = None
    restart: bool = False


class Generator(Protocol):
    """Streams the continuation of a chat.

    ``stream`` yields deltas as tokens are made; when the consumer stops iterating (or
    closes the iterator) the request is cancelled and its resources freed. Failures raise
    :class:`core.errors.GenerationError` (``GeneratorBusy`` when it cannot serve in time).
    """

    async def start(self) -> None:
        """Load models / connect; idempotent."""

    async def stop(self) -> None:
        """Release everything; idempotent."""

    def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """The continuation of ``request.messages``, piece by piece."""
        ...


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether a generator can take requests now (``/readyz``), and whether it can be
    expected to again (``/healthz``): ``healthy`` is False once it has given up."""

    ready: bool
    reason: str = ""
    healthy: bool = True


@runtime_checkable
class ReportsReadiness(Protocol):
    """A generator that knows more about its readiness than whether it is started."""

    def readiness(self) -> Readiness:
        """The generator's state now."""
        ...


def readiness_of(generator: object) -> Readiness:
    """``generator``'s readiness: its own report, else whether it is started."""
    if isinstance(generator, ReportsReadiness):
        return generator.readiness()
    if getattr(generator, "started", True):
        return Readiness(True)
    return Readiness(False, "not started")


S = TypeVar("S", bound=BaseModel)


def backend_settings(section: GenerationSection, model: type[S], *, source: str) -> S:
    """The backend's own keys of ``[generation]`` (all but the common ones), validated by
    its ``model``: a key it does not know is an error naming ``source`` and the key."""
    extra = section.model_extra or {}
    known = set(model.model_fields)
    problems = []
    for key in extra:
        if key in known:
            continue
        # A misspelt key gets the closest one, common or the backend's; a key that is right
        # under another backend is said to be not this backend's.
        hint = did_you_mean(key, [*known, *GenerationSection.model_fields])
        reason = f"unknown key{hint}" if hint else (
            f"not a setting of the {section.backend!r} backend")
        problems.append(f"{source}: generation.{key}: {reason}")
    if problems:
        raise ConfigError("\n".join(problems))
    return validate_section(model, extra, source=source, prefix="generation")


GeneratorFactory = Callable[[BotSettings], Generator]


def generator_backends() -> Registry[GeneratorFactory]:
    """A registry of generation backends, filled from the ``parley.generators`` entry points."""
    return Registry("generation backend", "parley.generators")

"""The wire format of the Redis generation queue, shared by front ends and workers.

Key layout (``{q}`` is ``generation.queue``; ``{rid}`` is the request id, percent-encoded
so that it holds no ``:``)::

    {q}:jobs          stream  one entry per job: {job: JSON}; consumer group ``workers``
    {q}:out:{rid}     stream  the reply: {attempt, text[, finish_reason | error][, worker]}
    {q}:cancel:{rid}  string  set by a front end that stopped listening (with a TTL)
    {q}:dead          stream  dead letters: {id, reason, attempts, worker, tenant, user,
                              job}; kept worker.dead_letter_ttl, deleted on forget

A job's JSON::

    {"v": 1, "id": rid, "messages": [{"role": ..., "content": ...}, ...],
     "sampling": {"max_new_tokens", "temperature", "top_p", "stop", "seed",
                  "repetition_penalty", "no_repeat_ngram_size", "finish_sentence",
                  "max_sentences"},   (the last four may be absent or null)
     "tenant": ..., "user": ..., "deadline": unix seconds}

The reply and cancel keys are derived from the id on both sides, never read from the
job, so a job cannot make a worker write anywhere but under its own queue.

Every reply entry carries the attempt that wrote it (the job's delivery count in the
consumer group): a job reclaimed from a dead worker is written again, from the start,
under a higher attempt, and the front end drops what the lower one wrote.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from redis.asyncio import Redis

from core.generation.base import (
    ChatMessage,
    FinishReason,
    GenerationRequest,
    SamplingParams,
)
from core.redis_client import key_part

GROUP = "workers"  # the consumer group every worker of a queue joins
VERSION = 1
QUEUE_CAP = 10_000  # jobs waiting or running, at most; past it a front end is told "busy"
DEAD_CAP = 10_000  # dead letters kept, about
REPLY_TTL = 600  # seconds an abandoned reply stream lives after its last write
REPLY_DONE_TTL = 30  # seconds a finished reply stays readable (for inspection)
CANCEL_TTL = 600  # seconds a cancel mark lives
MAX_ID_CHARS = 200

_FINISH_REASONS: frozenset[str] = frozenset(get_args(FinishReason))
_ROLES = ("system", "user", "assistant")


class MalformedJob(ValueError):
    """A job entry that cannot be served; ``request_id`` is set when it could be read."""

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


class MalformedReply(ValueError):
    """A reply entry that does not follow the wire format."""


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The Redis keys of one queue (see the module docstring)."""

    queue: str

    @property
    def jobs(self) -> str:
        """The stream jobs are submitted to."""
        return f"{self.queue}:jobs"

    @property
    def dead(self) -> str:
        """The stream of dead letters."""
        return f"{self.queue}:dead"

    def reply(self, request_id: str) -> str:
        """The reply stream of ``request_id``."""
        return f"{self.queue}:out:{key_part(request_id)}"

    def cancel(self, request_id: str) -> str:
        """The cancel mark of ``request_id``."""
        return f"{self.queue}:cancel:{key_part(request_id)}"


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """A decoded job: the request, and the time (unix seconds) it must start by."""

    request: GenerationRequest
    deadline: float


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply entry."""

    attempt: int
    text: str = ""
    finish_reason: FinishReason | None = None
    error: str | None = None
    worker: str | None = None


def encode_job(request: GenerationRequest, deadline: float) -> bytes:
    """The ``job`` field of a job entry."""
    s = request.sampling
    body = {
        "v": VERSION,
        "id": request.request_id,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "sampling": {
            "max_new_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "stop": list(s.stop),
            "seed": s.seed,
            "repetition_penalty": s.repetition_penalty,
            "no_repeat_ngram_size": s.no_repeat_ngram_size,
            "finish_sentence": s.finish_sentence,
            "max_sentences": s.max_sentences,
        },
        "tenant": request.tenant,
        "user": request.user,
        "deadline": deadline,
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def valid_request_id(request_id: object) -> bool:
    """Whether ``request_id`` can name a job (a non-empty string of bounded length)."""
    return isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_CHARS


def decode_job(fields: Mapping[bytes, bytes]) -> QueuedJob:
    """The job an entry's fields carry; :class:`MalformedJob` says why it cannot be."""
    raw = fields.get(b"job")
    if raw is None:
        raise MalformedJob("no 'job' field")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedJob(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedJob("not a JSON object")
    request_id = body.get("id")
    if not valid_request_id(request_id):
        raise MalformedJob("'id' is not a string of 1 to 200 characters")
    assert isinstance(request_id, str)
    try:
        return _decode_body(body, request_id)
    except (TypeError, ValueError, KeyError) as exc:
        raise MalformedJob(str(exc) or type(exc).__name__, request_id) from None


def _decode_body(body: dict[str, Any], request_id: str) -> QueuedJob:
    if body.get("v") != VERSION:
        raise ValueError(f"unknown version {body.get('v')!r}")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' is not a non-empty list")
    chat = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ValueError("a message has no valid 'role'")
        if not isinstance(m.get("content"), str):
            raise ValueError("a message has no string 'content'")
        chat.append(ChatMessage(m["role"], m["content"]))
    s = body["sampling"]
    if not isinstance(s, dict):
        raise ValueError("'sampling' is not an object")
    max_new = _number(s, "max_new_tokens", int, 1, 1_000_000)
    temperature = _number(s, "temperature", float, 0.0, 100.0)
    top_p = _number(s, "top_p", float, 0.0, 1.0)
    stop = s.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
        raise ValueError("'sampling.stop' is not a list of strings")
    seed = s.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError("'sampling.seed' is not an integer")
    # Absent from jobs of front ends older than these settings: the defaults.
    penalty = s.get("repetition_penalty")
    if penalty is not None:
        penalty = float(_number(s, "repetition_penalty", float, 1.0, 10.0))
    ngram = _optional_int(s, "no_repeat_ngram_size", 0, 64)
    max_sentences = _optional_int(s, "max_sentences", 1, 10_000)
    finish_sentence = s.get("finish_sentence", False)
    if not isinstance(finish_sentence, bool):
        raise ValueError("'sampling.finish_sentence' is not a boolean")
    tenant, user = body.get("tenant", ""), body.get("user", "")
    if not isinstance(tenant, str) or not isinstance(user, str):
        raise ValueError("'tenant' or 'user' is not a string")
    deadline = _number(body, "deadline", float, 0.0, math.inf)
    request = GenerationRequest(
        messages=tuple(chat),
        sampling=SamplingParams(int(max_new), float(temperature), float(top_p), tuple(stop),
                                seed, repetition_penalty=penalty, no_repeat_ngram_size=ngram,
                                finish_sentence=finish_sentence, max_sentences=max_sentences),
        tenant=tenant,
        user=user,
        request_id=request_id,
    )
    return QueuedJob(request, float(deadline))


def _number(data: dict[str, Any], name: str, kind: type, low: float, high: float) -> float:
    value = data.get(name)
    ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not low <= float(value) <= high:  # type: ignore[arg-type]
        raise ValueError(f"'{name}' is not a {kind.__name__} in [{low}, {high}]")
    return float(value)  # type: ignore[arg-type]


def _optional_int(data: dict[str, Any], name: str, low: int, high: int) -> int | None:
    if data.get(name) is None:
        return None
    return int(_number(data, name, int, low, high))


def encode_reply(reply: Reply) -> dict[str, str]:
    """The fields of a reply entry."""
    fields = {"attempt": str(reply.attempt), "text": reply.text}
    if reply.finish_reason is not None:
        fields["finish_reason"] = reply.finish_reason
    if reply.error is not None:
        fields["error"] = reply.error
    if reply.worker is not None:
        fields["worker"] = reply.worker
    return fields


def decode_reply(fields: Mapping[bytes, bytes]) -> Reply:
    """A reply entry's fields, checked; :class:`MalformedReply` if they are not."""
    try:
        attempt = int(fields[b"attempt"])
        text = fields.get(b"text", b"").decode("utf-8")
        finish = fields.get(b"finish_reason")
        error = fields.get(b"error")
        worker = fields.get(b"worker")
    except (KeyError, ValueError) as exc:
        raise MalformedReply(f"malformed reply entry: {exc}") from None
    reason = finish.decode("ascii", errors="replace") if finish is not None else None
    if reason is not None and reason not in _FINISH_REASONS:
        raise MalformedReply(f"unknown finish reason {reason!r}")
    return Reply(
        attempt=attempt,
        text=text,
        finish_reason=reason,  # type: ignore[arg-type]  # checked against FinishReason
        error=error.decode("utf-8", errors="replace") if error is not None else None,
        worker=worker.decode("utf-8", errors="replace") if worker is not None else None,
    )


async def dead_letter(
    client: Redis, keys: QueueKeys, entry_id: str, raw: bytes, *, request_id: str | None,
    attempts: int, reason: str, worker: str, ttl: float, job: QueuedJob | None = None,
) -> None:
    """Move a job to the dead-letter stream and tell its front end, if it has one.

    Dead letters hold the whole prompt: they are kept ``ttl`` seconds
    (``worker.dead_letter_ttl``), and carry the job's tenant and user so ``parley forget``
    finds them (:func:`forget_dead_letters`).
    """
    ttl_ms = int(ttl * 1000)
    letter: dict[Any, Any] = {"id": entry_id, "reason": reason, "attempts": attempts,
                              "worker": worker}
    if job is not None:
        letter.update(tenant=job.request.tenant, user=job.request.user)
    letter["job"] = raw[:65536]
    pipe = client.pipeline(transaction=True)
    pipe.xadd(keys.dead, letter, maxlen=DEAD_CAP, approximate=True)
    pipe.xtrim(keys.dead, minid=max(int(time.time() * 1000) - ttl_ms, 0))
    pipe.pexpire(keys.dead, ttl_ms)
    if request_id is not None:
        reply = keys.reply(request_id)
        fields: dict[Any, Any] = encode_reply(Reply(attempts, error=reason, worker=worker))
        pipe.xadd(reply, fields)
        pipe.expire(reply, REPLY_TTL)
    pipe.xack(keys.jobs, GROUP, entry_id)
    pipe.xdel(keys.jobs, entry_id)
    await pipe.execute()


async def forget_dead_letters(client: Redis, keys: QueueKeys, tenant: str, user: str) -> int:
    """Delete the dead letters of ``user`` (as the engine names users: ``channel:id``) of
    ``tenant`` (the bot); returns how many went. Reads the stream in pages."""
    gone, start = 0, "-"
    while True:
        rows: Any = await client.xrange(keys.dead, min=start, count=500)
        if not rows:
            return gone
        mine = []
        for entry_id, fields in rows:
            who = (fields.get(b"tenant"), fields.get(b"user"))
            if who == (None, None):  # written before dead letters named their user
                try:
                    body = json.loads(fields.get(b"job", b"{}"))
                    who = (str(body.get("tenant", "")).encode(),
                           str(body.get("user", "")).encode())
                except (ValueError, AttributeError):
                    continue
            if who == (tenant.encode(), user.encode()):
                mine.append(entry_id)
        if mine:
            gone += int(await client.xdel(keys.dead, *mine))
        last = rows[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else last)

"""Bot configuration: one TOML file per bot, validated once at start into typed settings.

Secrets never live in the file: a string value ``"${DISCORD_TOKEN}"`` is replaced by the
environment variable of that name when the file is loaded. Every error names the file,
the key and what was expected.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from core.errors import ConfigError

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

M = TypeVar("M", bound=BaseModel)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BotSection(Section):
    """``[bot]``: who the bot is."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    persona: str = "You are a helpful assistant."
    # Example exchanges, [user, assistant] pairs, that the model sees before the
    # conversation (few-shot turns): how the persona answers (core/prompt.py).
    examples: tuple[tuple[str, str], ...] = Field(default=(), max_length=8)
    max_message_chars: int = Field(default=4000, ge=1, le=100_000)
    # Back-pressure before a conversation's lane: messages of one conversation waiting
    # in this process behind the one being answered, and messages of one user in flight
    # here; beyond either the caller is told to slow down at once (HTTP 429).
    max_queued: int = Field(default=16, ge=0, le=10_000)
    max_in_flight_per_user: int = Field(default=32, ge=1, le=100_000)


class GenerationSection(Section):
    """``[generation]``: which generator answers, and how it samples.

    The other keys belong to the chosen backend, which validates them with a model of its
    own when it is built (``core.generation.base.backend_settings``): ``max_batch`` under
    ``backend = "openai"`` is an error naming the file and the key.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    backend: str = "local"
    model: str = "smollm2-135m"
    max_new_tokens: int = Field(default=128, ge=1, le=8192)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    # Repetition control on the reply's own tokens; unset: the model preset's default.
    repetition_penalty: float | None = Field(default=None, ge=1.0, le=3.0)  # 1 = off
    no_repeat_ngram_size: int | None = Field(default=None, ge=0, le=32)  # 0 = off
    # Near max_new_tokens a reply ends at its next sentence end instead of mid-word (it
    # starts wrapping up at three quarters and may run a quarter over to finish).
    finish_sentence: bool = True
    max_sentences: int | None = Field(default=None, ge=1, le=1000)  # end after this many
    timeout: float = Field(default=120.0, gt=0.0)


class ApiKeySection(Section):
    """One ``[[... .api_keys]]`` entry: a bearer key (from ``${ENV}``) and who holds it.

    The holder's ``tenant`` is who the calls are for (the fair queue's tenant on the
    worker's API, the namespace of user and conversation ids on the chat API);
    ``max_in_flight`` bounds the requests the key may have running at once.
    """

    key: str = Field(min_length=16)
    tenant: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    max_in_flight: int = Field(default=16, ge=1, le=100_000)


def unique_keys(keys: list[ApiKeySection]) -> list[ApiKeySection]:
    """``keys``, refusing a key or a tenant given twice."""
    if len({k.key for k in keys}) != len(keys) or len({k.tenant for k in keys}) != len(keys):
        raise ValueError("each api key and each tenant may appear once")
    return keys


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WorkerSection(Section):
    """``[worker]``: how ``parley worker`` serves generation jobs from Redis and HTTP.

    ``url`` defaults to ``[generation] url`` when the generation backend is ``redis``
    (see :class:`BotSettings`), so one file means one Redis unless told otherwise.
    """

    url: str = DEFAULT_REDIS_URL
    backend: str = "local"  # the generator the jobs run on: local or echo
    name: str | None = None  # consumer name; default: host name and process id
    concurrency: int = Field(default=32, ge=1, le=4096)
    claim_idle: float = Field(default=15.0, gt=0.0)  # seconds before a silent job is reclaimed
    heartbeat: float = Field(default=3.0, gt=0.0)
    max_attempts: int = Field(default=3, ge=1)
    # Dead letters hold whole prompts: kept this many seconds (and gone on forget).
    dead_letter_ttl: float = Field(default=7 * 86400.0, ge=1.0)
    http_host: str = "127.0.0.1"
    http_port: int | None = Field(default=None, ge=0, le=65535)  # OpenAI-compatible API
    # Bearer keys of the HTTP API; required to listen beyond loopback.
    api_keys: Annotated[list[ApiKeySection], AfterValidator(unique_keys)] = []

    @model_validator(mode="after")
    def _keys_beyond_loopback(self) -> WorkerSection:
        if self.http_port is not None and not self.api_keys and not is_loopback(self.http_host):
            raise ValueError(f"http_host {self.http_host!r} is reachable from other machines: "
                             "set api_keys ([[worker.api_keys]] key = \"${ENV}\", tenant = "
                             "\"...\") or listen on 127.0.0.1")
        return self

    @model_validator(mode="after")
    def _heartbeat_well_inside_claim_idle(self) -> WorkerSection:
        # Two heartbeats must fit in claim_idle, or one late heartbeat lets the job be
        # reclaimed (by another worker, or by this one) while it is being answered.
        if self.heartbeat >= self.claim_idle / 2:
            raise ValueError(f"heartbeat ({self.heartbeat:g} s) must be less than half of "
                             f"claim_idle ({self.claim_idle:g} s)")
        return self


class MemorySection(Section):
    """``[memory]``: where conversations are kept."""

    backend: str = "embedded"
    url: str = DEFAULT_REDIS_URL
    window: int = Field(default=20, ge=1, le=1000)
    ttl: int = Field(default=7 * 24 * 3600, ge=1)
    key_prefix: str = Field(default="parley", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    timeout: float = Field(default=2.0, gt=0.0)
    # The redelivery window: an answered message id (and its reply, replayed to a
    # redelivery) is kept this many seconds, and at most ``dedupe_max`` per conversation.
    dedupe_window: float = Field(default=3600.0, ge=1.0, le=7 * 24 * 3600.0)
    dedupe_max: int = Field(default=200, ge=1, le=5000)
    # The lease that keeps one conversation's messages in order across front ends:
    # renewed while a reply is being made, so a crashed holder blocks its conversation
    # for at most this long.
    lease: float = Field(default=30.0, ge=0.5, le=3600.0)

    @model_validator(mode="after")
    def _window_holds_a_lease(self) -> MemorySection:
        if self.dedupe_window < self.lease:
            raise ValueError("dedupe_window must be at least lease (a message id being "
                             "answered is kept that long)")
        return self


ModerationActionName = Literal["allow", "mask", "warn", "block", "mute", "escalate"]
# What moderation detects, by category; each has its own action, points, classifier
# threshold and reply. "size", "flood", "leak" (the reply repeats the bot's instructions)
# and "failure" are kinds too. A filter's name ("terms", "classifier") may also be used as
# a key of ``actions`` / ``points``: it then applies to whatever that filter finds.
MODERATION_CATEGORIES = ("insult", "threat", "hate", "sexual", "selfharm", "spam", "pii",
                         "injection")
DEFAULT_ACTIONS: dict[str, ModerationActionName] = {
    "insult": "block", "threat": "block", "hate": "block", "sexual": "block",
    "selfharm": "block", "spam": "block", "pii": "mask", "injection": "block",
    "size": "block", "flood": "block", "leak": "block",
}
# Someone who speaks of hurting themselves is answered with care, never muted for it.
DEFAULT_POINTS = {"insult": 2.0, "threat": 2.0, "hate": 2.0, "sexual": 2.0, "selfharm": 0.0,
                  "spam": 1.0, "injection": 2.0, "flood": 1.0}
DEFAULT_REPLIES = {
    "insult": "Let's keep this respectful: I won't reply to insults.",
    "threat": "I can't continue with threats of violence.",
    "hate": "I won't respond to hateful messages about people or groups.",
    "sexual": "I can't take part in sexual conversations.",
    "selfharm": (
        "I'm really sorry you're going through this. You don't have to face it alone: "
        "please reach out to someone you trust, or to a local crisis line or emergency "
        "number right now."
    ),
    "spam": "That looks like spam, so I'll skip it.",
    "injection": (
        "I can't change how I work or share my instructions, but I'm happy to help with "
        "something else."
    ),
}


class ModerationPolicy(Section):
    """What the moderation filters check and do; the ``[moderation]`` keys of one channel.

    ``[moderation]`` sets them for the bot; ``[moderation.channels.NAME]`` overrides any
    of them for one channel (``discord``, ``telegram``, ``web``, ``console``, ...).
    Filters are named in ``input_filters`` / ``output_filters``, in the order they run.
    """

    input_filters: list[str] = [
        "size", "terms", "classifier", "pii", "injection", "spam", "flood",
    ]
    output_filters: list[str] = ["terms", "classifier", "pii", "leak"]
    # A lower limit than ``[bot] max_message_chars`` for this channel; by default the
    # bot's one limit applies (the engine refuses longer messages with a clear error).
    max_chars: int | None = Field(default=None, ge=1, le=100_000)
    # Terms: matched on normalised text (NFKC, look-alike letters folded, invisible
    # characters gone, leetspeak folded); ``word*`` matches words starting with ``word``,
    # ``*part*`` any word containing ``part``. Files hold one term a line (``#`` starts
    # a comment); bot terms count as insults.
    builtin_terms: bool = True
    blocklist: list[str] = []
    allowlist: list[str] = []
    blocklist_files: list[str] = []
    allowlist_files: list[str] = []
    classifier: str = "ngram"
    # A classifier that gives one score (not one per category) is judged against this.
    classifier_threshold: float = Field(default=0.90, ge=0.0, le=1.0)
    # Per-category thresholds, over the classifier's own (the n-gram model ships
    # thresholds chosen on the development set).
    thresholds: dict[str, float] = {}
    output_threshold: float = Field(default=0.90, ge=0.0, le=1.0)
    pii: list[str] = ["email", "phone", "card", "iban"]
    injection_threshold: float = Field(default=1.0, gt=0.0)
    # Output: a reply that repeats ``leak_chars`` characters of the system text (persona,
    # plugin instructions) verbatim or nearly, or the canary, is withheld.
    leak_chars: int = Field(default=40, ge=12, le=2000)
    canary: str | None = None
    # Flood control: at most N messages per window (seconds), per user and per conversation.
    user_rate: int = Field(default=8, ge=1)
    user_window: float = Field(default=10.0, gt=0.0)
    conversation_rate: int = Field(default=30, ge=1)
    conversation_window: float = Field(default=10.0, gt=0.0)
    # The action each finding leads to, and the violation points it adds: changes to
    # DEFAULT_ACTIONS and DEFAULT_POINTS (a channel's changes go on top of the bot's).
    actions: dict[str, ModerationActionName] = {}
    points: dict[str, float] = {}
    # The violation score decays by half every ``half_life`` seconds; past ``warn_at``
    # a refusal carries a warning, past ``mute_at`` the user is muted, past
    # ``escalate_at`` the case is handed to people.
    half_life: float = Field(default=600.0, gt=0.0)
    warn_at: float = Field(default=3.0, ge=0.0)
    mute_at: float = Field(default=5.0, ge=0.0)
    escalate_at: float = Field(default=10.0, ge=0.0)
    mute_seconds: float = Field(default=300.0, gt=0.0)
    # Fail modes when a filter raises or runs past ``filter_timeout`` seconds: input
    # "open" falls back to the blocklist, "closed" refuses; output "closed" replaces
    # the reply, "open" lets it through.
    filter_timeout: float = Field(default=0.5, gt=0.0)
    fail_input: Literal["open", "closed"] = "open"
    fail_output: Literal["open", "closed"] = "closed"
    hold_chars: int = Field(default=160, ge=16, le=4000)
    # What users are told: ``replies`` by category (over DEFAULT_REPLIES), then these.
    replies: dict[str, str] = {}
    block_reply: str = "Sorry, I can't help with that message."
    warn_notice: str = "Repeated violations of the rules will get you muted for a while."
    mute_reply: str = "You are muted for {minutes} more minute(s)."
    escalate_reply: str = "I've passed this conversation to a human moderator."
    flood_reply: str = "You're sending messages too fast. Please slow down."
    size_reply: str = "That message is too long ({chars} characters, at most {limit})."
    output_replacement: str = "Sorry, I can't share that answer. Let's talk about something else."
    failure_reply: str = "Sorry, I can't check messages right now. Please try again shortly."


class ModerationSection(ModerationPolicy):
    """``[moderation]``: input checks and output guard, per bot and per channel.

    Shared state (flood counters, violation scores, mutes, the audit log) lives in Redis
    when ``state = "redis"``, or ``"auto"`` with ``[memory] backend = "redis"`` (then
    ``url`` and ``key_prefix`` default to memory's); in this process otherwise.
    """

    backend: str = "passthrough"
    state: Literal["auto", "memory", "redis"] = "auto"
    url: str | None = None
    key_prefix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    audit_max_entries: int = Field(default=100_000, ge=10)
    audit_retention: float = Field(default=30 * 86400.0, gt=0.0)
    audit_key: str | None = None  # keys the content hash; set it from ${ENV}
    # Each classifier's own options (``[moderation.classifier_options.NAME]``), which
    # its factory validates (an external classifier's URL, model, timeout, ...).
    classifier_options: dict[str, dict[str, Any]] = {}
    channels: dict[str, ModerationPolicy] = {}

    def for_channel(self, channel: str) -> ModerationPolicy:
        """The policy of ``channel``: the bot's, with the channel's overrides applied."""
        fields = {name: getattr(self, name) for name in ModerationPolicy.model_fields}
        override = self.channels.get(channel)
        if override is not None:
            for name in override.model_fields_set:
                fields[name] = getattr(override, name)
        fields["actions"] = {**DEFAULT_ACTIONS, **self.actions,
                             **(override.actions if override else {})}
        fields["points"] = {**DEFAULT_POINTS, **self.points,
                            **(override.points if override else {})}
        fields["replies"] = {**DEFAULT_REPLIES, **self.replies,
                             **(override.replies if override else {})}
        fields["thresholds"] = {**self.thresholds,
                                **(override.thresholds if override else {})}
        return ModerationPolicy.model_validate(fields)


class PluginsSection(Section):
    """``[plugins]``: which plugins, who may use admin commands, and each plugin's table.

    ``modules`` are dotted module paths or paths relative to the bot's file; entry-point
    plugins (``parley.plugins``) load unless named in ``disable``. ``admins`` lists the
    admin user ids per channel. Every other key is a plugin's own table,
    ``[plugins.NAME]``, validated by that plugin (see ``core.plugin_loader``).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    modules: list[str] = []
    disable: list[str] = []
    admins: dict[str, list[str]] = {}
    context_tokens: int = Field(default=512, ge=0, le=100_000)  # plugin context, at most
    # How long one call into a plugin (a command, pre-hook or context provider) may take
    # before the user gets an apology instead.
    timeout: float = Field(default=10.0, gt=0.0, le=600.0)

    @model_validator(mode="after")
    def _tables_are_tables(self) -> PluginsSection:
        for name, value in (self.model_extra or {}).items():
            if not isinstance(value, dict):
                raise ValueError(f"plugins.{name} must be a table ([plugins.{name}]), "
                                 f"got {type(value).__name__}")
        return self

    @property
    def tables(self) -> dict[str, dict[str, Any]]:
        """The plugins' own tables, by plugin name."""
        return dict(self.model_extra or {})


class BotSettings(Section):
    """A whole bot: the validated contents of one TOML file."""

    bot: BotSection
    generation: GenerationSection = GenerationSection()
    memory: MemorySection = MemorySection()
    moderation: ModerationSection = ModerationSection()
    plugins: PluginsSection = PluginsSection()
    worker: WorkerSection = WorkerSection()
    # Each adapter validates its own slice (see ``validate_section``).
    adapters: dict[str, dict[str, Any]] = {}
    source: str = "<memory>"

    @model_validator(mode="before")
    @classmethod
    def _worker_follows_generation(cls, data: Any) -> Any:
        """``[worker] url`` unset: the Redis the front ends send jobs to (``[generation] url``).

        Without this, a worker started on the front ends' own file would listen on the
        default Redis while their jobs wait, unread, in another one.
        """
        if not isinstance(data, Mapping):
            return data
        generation, worker = data.get("generation"), data.get("worker", {})
        if (isinstance(generation, Mapping) and isinstance(worker, Mapping)
                and generation.get("backend") == "redis" and "url" not in worker
                and isinstance(generation.get("url"), str)):
            return {**data, "worker": {**worker, "url": generation["url"]}}
        return data


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> BotSettings:
    """Read, interpolate and validate the bot file at ``path``."""
    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return parse_settings(raw, source=str(file), env=env)


def parse_settings(
    raw: Mapping[str, Any], *, source: str = "<memory>", env: Mapping[str, str] | None = None
) -> BotSettings:
    """Validate an already-parsed mapping (for tests and embedding)."""
    data = _interpolate(dict(raw), source, env if env is not None else os.environ, ())
    data["source"] = source
    return validate_section(BotSettings, data, source=source)


def validate_section(
    model: type[M], data: Mapping[str, Any], *, source: str, prefix: str = ""
) -> M:
    """Validate ``data`` against ``model``; errors name ``source`` and the dotted key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(part for part in (prefix, *map(str, err["loc"])) if part)
            problems.append(f"{source}: {key or '<top>'}: {_describe(err, model)}")
        raise ConfigError("\n".join(problems)) from None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to a misspelt ``name``, else ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a table at ``loc`` inside ``model`` accepts (none known: empty)."""
    current: Any = model
    parts = list(loc)
    while parts:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(parts.pop(0)))
            if field is None:
                return []
            current = field.annotation
        elif get_origin(current) in (Union, types.UnionType):  # X | None
            inner = [arg for arg in get_args(current) if arg is not type(None)]
            if len(inner) != 1:
                return []
            current = inner[0]
        elif get_origin(current) is dict:  # a table of tables: the next part is a name
            parts.pop(0)
            current = get_args(current)[1]
        else:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _describe(err: Mapping[str, Any], model: type[BaseModel]) -> str:
    kind = err.get("type", "")
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        loc = tuple(err.get("loc", ()))
        hint = did_you_mean(str(loc[-1]), _keys_at(model, loc[:-1])) if loc else ""
        return "unknown key" + hint
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return f"{err.get('msg', 'invalid value')} (got {shown})"


def _interpolate(value: Any, source: str, env: Mapping[str, str], path: tuple[str, ...]) -> Any:
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                key = ".".join(path)
                raise ConfigError(
                    f"{source}: {key}: environment variable {name} is not set "
                    f"(the file refers to it as ${{{name}}})"
                )
            return env[name]

        return _ENV_REF.sub(lookup, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, source, env, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, source, env, (*path, str(i))) for i, v in enumerate(value)]
    return value


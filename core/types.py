"""The vocabulary every part of Parley speaks: messages in, turns stored, events out."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import FrozenInstanceError, dataclass, field
from enum import StrEnum
from typing import Literal, NamedTuple

Role = Literal["system", "user", "assistant"]


class ConversationKey:
    """Identifies one conversation of one bot on one channel.

    Immutable and hashable, as a frozen dataclass; not one, as its hash is made once: a
    message's key is hashed by each dict it passes (its lane, its history, ...), and a
    frozen dataclass builds a tuple for every hash and two for every comparison.
    """

    __slots__ = ("_hash", "bot", "channel", "conversation_id")
    __match_args__ = ("bot", "channel", "conversation_id")

    bot: str
    channel: str
    conversation_id: str
    _hash: int

    def __init__(self, bot: str, channel: str, conversation_id: str) -> None:
        _set_bot(self, bot)
        _set_channel(self, channel)
        _set_conversation_id(self, conversation_id)
        _set_hash(self, hash((bot, channel, conversation_id)))

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[type[ConversationKey], tuple[str, str, str]]:
        return ConversationKey, (self.bot, self.channel, self.conversation_id)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not ConversationKey:
            return NotImplemented
        assert isinstance(other, ConversationKey)
        return (self.conversation_id == other.conversation_id and self.channel == other.channel
                and self.bot == other.bot)

    def __repr__(self) -> str:
        return (f"ConversationKey(bot={self.bot!r}, channel={self.channel!r}, "
                f"conversation_id={self.conversation_id!r})")

    def __str__(self) -> str:
        return f"{self.bot}/{self.channel}/{self.conversation_id}"


# A frozen class sets its own slots through their descriptors: a frozen dataclass's
# object.__setattr__ per field costs twice as much, and these are made for every message.
_set_bot, _set_channel, _set_conversation_id, _set_hash = (
    getattr(ConversationKey, name).__set__
    for name in ("bot", "channel", "conversation_id", "_hash"))


@dataclass(frozen=True, slots=True, init=False)
class IncomingMessage:
    """A user's message as an adapter hands it to the engine.

    ``message_id`` is the platform's id for the message; a redelivered event carries the
    same id and is answered once.
    """

    bot: str
    channel: str
    conversation_id: str
    user_id: str
    message_id: str
    text: str
    user_name: str | None = None
    received_at: float = field(default_factory=time.time)
    metadata: Mapping[str, str] = field(default_factory=dict)
    # The conversation this message belongs to: made once, as the lane, memory, the
    # prompt and the channel each ask for it.
    key: ConversationKey = field(init=False, repr=False, compare=False)

    def __init__(self, bot: str, channel: str, conversation_id: str, user_id: str,
                 message_id: str, text: str, user_name: str | None = None,
                 received_at: float | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        # The dataclass's own __init__, but through the slots' descriptors (see
        # ConversationKey), unrolled: a loop over them costs as much as it saves.
        (set_bot, set_channel, set_conversation_id, set_user_id, set_message_id, set_text,
         set_user_name, set_received_at, set_metadata, set_key) = _set_message
        set_bot(self, bot)
        set_channel(self, channel)
        set_conversation_id(self, conversation_id)
        set_user_id(self, user_id)
        set_message_id(self, message_id)
        set_text(self, text)
        set_user_name(self, user_name)
        set_received_at(self, time.time() if received_at is None else received_at)
        set_metadata(self, {} if metadata is None else metadata)
        set_key(self, ConversationKey(bot, channel, conversation_id))


@dataclass(frozen=True, slots=True, init=False)
class Turn:
    """One stored utterance of a conversation."""

    role: Role
    text: str
    user_id: str | None = None
    message_id: str | None = None
    at: float = field(default_factory=time.time)

    def __init__(self, role: Role, text: str, user_id: str | None = None,
                 message_id: str | None = None, at: float | None = None) -> None:
        # The dataclass's own __init__, but through the slots' descriptors (see
        # ConversationKey), unrolled.
        set_role, set_text, set_user_id, set_message_id, set_at = _set_turn
        set_role(self, role)
        set_text(self, text)
        set_user_id(self, user_id)
        set_message_id(self, message_id)
        set_at(self, time.time() if at is None else at)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready form, used by the memory backends."""
        return {
            "role": self.role,
            "text": self.text,
            "user_id": self.user_id,
            "message_id": self.message_id,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Turn:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on a malformed record."""
        role = data.get("role")
        text = data.get("text")
        if role not in ("system", "user", "assistant") or not isinstance(text, str):
            raise ValueError(f"malformed turn record: {data!r}")
        user_id = data.get("user_id")
        message_id = data.get("message_id")
        at = data.get("at")
        return cls(
            role=role,
            text=text,
            user_id=user_id if isinstance(user_id, str) else None,
            message_id=message_id if isinstance(message_id, str) else None,
            at=float(at) if isinstance(at, int | float) else 0.0,
        )


# Set through the slots' descriptors (see ConversationKey).
_set_message = tuple(getattr(IncomingMessage, name).__set__ for name in (
    "bot", "channel", "conversation_id", "user_id", "message_id", "text", "user_name",
    "received_at", "metadata", "key"))
_set_turn = tuple(getattr(Turn, name).__set__
                  for name in ("role", "text", "user_id", "message_id", "at"))


class ReplyKind(StrEnum):
    """What a :class:`ReplyEvent` carries."""

    TYPING = "typing"  # the bot is working on an answer
    DELTA = "delta"  # a piece of the answer, to append to what was shown
    RESET = "reset"  # discard the deltas shown so far: the answer starts again
    FINAL = "final"  # the whole answer; ends the stream
    NOTICE = "notice"  # a short message that is not the model's (e.g. a command's reply)
    ERROR = "error"  # the message could not be answered; ``text`` is safe to show


# Looked up once: reading a member off an enum class costs more than the test.
_LAST = (ReplyKind.FINAL, ReplyKind.NOTICE, ReplyKind.ERROR)


class _NoMetadata(Mapping[str, str]):
    """The metadata of an event that has none: one shared mapping, empty and read-only
    so that no event's metadata can change another's. Pickled and copied as itself (a
    ``MappingProxyType`` can be neither, and events cross process boundaries)."""

    __slots__ = ()

    def __getitem__(self, key: str) -> str:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "{}"

    def __reduce__(self) -> str:
        return "NO_METADATA"  # the module's own instance


NO_METADATA: Mapping[str, str] = _NoMetadata()


class ReplyEvent(NamedTuple):
    """One event of the stream the engine yields for a message.

    A stream ends with exactly one FINAL, NOTICE or ERROR event. ``action`` says what
    moderation did with the message ("allow", "mask", "block", ...). ``code`` is a
    machine-readable reason on ERROR events ("invalid_input", "memory_unavailable", ...).

    Immutable, as a frozen dataclass would be, but a tuple: a message's reply makes one
    per word, and a frozen dataclass's ``__init__`` (an ``object.__setattr__`` per
    field) cost four times as much as building the tuple.
    """

    kind: ReplyKind
    text: str = ""
    action: str = "allow"
    code: str | None = None
    # What produced the reply, for clients and logs (e.g. ``{"faq_entry": "returns"}``).
    metadata: Mapping[str, str] = NO_METADATA

    @property
    def is_last(self) -> bool:
        """Whether this event ends the stream."""
        return self.kind in _LAST

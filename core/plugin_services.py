"""The services a plugin is handed: storage, outbound messages, pauses, linked accounts.

Nothing here is global: one :class:`PluginServices` per bot, built with the bot's
stores and passed to every plugin through its :class:`core.plugins.Plugin` handle.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ParleyError
from core.forget import Forgetting
from core.plugin_store import Bounds, BucketStore, EmbeddedBuckets
from core.redis_client import key_part
from core.types import ConversationKey

if TYPE_CHECKING:
    from core.generation.base import Generator
    from core.memory.base import MemoryStore
    from core.metrics import Metrics
    from core.moderation.base import Moderator

log = logging.getLogger(__name__)

Sender = Callable[[ConversationKey, str], Awaitable[None]]
Identity = tuple[str, str]  # (channel, user id): a channel vouches for its users' ids
CORE = "parley"  # the namespace of the services' own buckets


class DeliveryError(ParleyError):
    """An outbound message could not be handed to any adapter."""


class Bucket:
    """A small map of JSON values kept for a plugin (one hash in Redis)."""

    def __init__(self, store: BucketStore, name: str, ttl: float | None = None) -> None:
        self.store = store
        self.name = name
        self.ttl = ttl

    async def get(self, field: str, default: Any = None) -> Any:
        """The value of ``field``, or ``default``."""
        raw = await self.store.get(self.name, field)
        return default if raw is None else json.loads(raw)

    async def set(self, field: str, value: Any) -> None:
        """Store ``value`` (anything JSON can hold) under ``field``."""
        await self.store.put(self.name, {field: json.dumps(value)}, self.ttl)

    async def update(self, values: dict[str, Any]) -> None:
        """Store several fields at once."""
        await self.store.put(self.name, {k: json.dumps(v) for k, v in values.items()},
                             self.ttl)

    async def items(self) -> dict[str, Any]:
        """Every field and value."""
        return {k: json.loads(v) for k, v in (await self.store.items(self.name)).items()}

    async def delete(self, *fields: str) -> int:
        """Delete ``fields``; how many there were."""
        return await self.store.remove(self.name, *fields)

    async def clear(self) -> bool:
        """Delete the whole bucket; whether it existed."""
        return await self.store.drop(self.name) > 0

    async def incr(self, field: str, by: int = 1, *, bounds: Bounds | None = None,
                   start: int = 0) -> int:
        """Add ``by`` to an integer field (``start`` if absent) and return the new value,
        atomically (concurrent calls never lose one); clamped to ``bounds`` (low, high)."""
        return await self.store.incr(self.name, field, by, self.ttl, bounds=bounds, start=start)

    async def extend(self, field: str, items: Sequence[str], *, cap: int,
                     start: Sequence[str] = ()) -> list[str]:
        """Add the ``items`` not yet in a list of strings (``start`` if absent), keep its
        last ``cap``, and return it, atomically (concurrent calls never lose an item)."""
        return await self.store.extend(self.name, field, items, cap, self.ttl, start=start)


def _bucket_name(namespace: str, scope: str, *parts: str) -> str:
    return ":".join([key_part(namespace), scope, *(key_part(p) for p in parts)])


class Storage:
    """One plugin's buckets: global, per user (deleted by ``/forget``), per conversation
    (expiring with the conversation's memory)."""

    def __init__(self, store: BucketStore, plugin: str, conversation_ttl: float) -> None:
        self.store = store
        self.plugin = plugin
        self.conversation_ttl = conversation_ttl

    def bucket(self, name: str, ttl: float | None = None) -> Bucket:
        """A bucket of this plugin's own, by name."""
        return Bucket(self.store, _bucket_name(self.plugin, "g", name), ttl)

    def user(self, channel: str, user_id: str) -> Bucket:
        """What this plugin keeps about one user; ``/forget`` deletes it."""
        return Bucket(self.store, _bucket_name(self.plugin, "u", channel, user_id))

    def conversation(self, key: ConversationKey) -> Bucket:
        """Per-conversation state; it expires like the conversation's memory."""
        return Bucket(self.store, _bucket_name(self.plugin, "c", key.channel,
                                               key.conversation_id), self.conversation_ttl)


class Outbox:
    """Messages the bot sends on its own, delivered by the adapter of the channel.

    Adapters register a sender for their channel when they start (and the handle it
    returns unregisters it); a plugin calls :meth:`send`.
    """

    def __init__(self) -> None:
        self._senders: dict[str, Sender] = {}

    def register(self, channel: str, sender: Sender) -> Callable[[], None]:
        """Deliver ``channel``'s outbound messages with ``sender``; returns the undo."""
        self._senders[channel] = sender

        def unregister() -> None:
            if self._senders.get(channel) is sender:
                del self._senders[channel]

        return unregister

    @property
    def channels(self) -> list[str]:
        """The channels that can be sent to now."""
        return sorted(self._senders)

    async def send(self, key: ConversationKey, text: str) -> None:
        """Send ``text`` into the conversation ``key``; :class:`DeliveryError` if no
        adapter serves its channel (or the adapter's own error if delivery fails)."""
        sender = self._senders.get(key.channel)
        if sender is None:
            raise DeliveryError(f"no adapter delivers to channel {key.channel!r} "
                                f"(serving: {', '.join(self.channels) or 'none'})")
        await sender(key, text)


@dataclass(frozen=True, slots=True)
class Pause:
    """Why the bot is quiet in a conversation."""

    by: str  # the plugin that paused it
    reason: str
    since: float


class Pauses:
    """Pause and resume the bot per conversation; kept in the bot's store, so a pause
    survives restarts and holds on every front end."""

    def __init__(self, store: BucketStore, bot: str) -> None:
        self._bucket = Bucket(store, _bucket_name(CORE, "paused", bot))

    @staticmethod
    def _field(key: ConversationKey) -> str:
        return f"{key_part(key.channel)}:{key_part(key.conversation_id)}"

    async def pause(self, key: ConversationKey, *, by: str, reason: str = "") -> None:
        """Stop the bot answering in ``key`` until :meth:`resume`."""
        await self._bucket.set(self._field(key), {"by": by, "reason": reason,
                                                  "since": time.time()})

    async def resume(self, key: ConversationKey) -> bool:
        """Let the bot answer in ``key`` again; whether it was paused."""
        return await self._bucket.delete(self._field(key)) > 0

    async def paused(self, key: ConversationKey) -> Pause | None:
        """The pause in force in ``key``, or None."""
        raw = await self._bucket.get(self._field(key))
        return None if raw is None else Pause(raw["by"], raw["reason"], raw["since"])


class Accounts:
    """Accounts of one person on several channels, linked only by that person's act."""

    def __init__(self, store: BucketStore) -> None:
        self.store = store

    def _bucket(self, who: Identity) -> Bucket:
        return Bucket(self.store, _bucket_name(CORE, "links", *who))

    async def link(self, a: Identity, b: Identity) -> None:
        """Record that ``a`` and ``b`` are the same person (both ways)."""
        await self._bucket(a).set(json.dumps(list(b)), True)
        await self._bucket(b).set(json.dumps(list(a)), True)

    async def linked(self, who: Identity, *, limit: int = 16) -> list[Identity]:
        """``who`` and every identity linked to it, directly or through others."""
        found: list[Identity] = [who]
        i = 0
        while i < len(found) and len(found) < limit:
            for raw in await self._bucket(found[i]).items():
                channel, user = json.loads(raw)
                if (channel, user) not in found:
                    found.append((channel, user))
            i += 1
        return found

    async def unlink(self, identities: Iterable[Identity]) -> int:
        """Forget the links of ``identities``."""
        return await self.store.drop(*(self._bucket(who).name for who in identities))


def default_store() -> BucketStore:
    """The store a registry built without services uses: this process's memory."""
    return EmbeddedBuckets()


@dataclass
class PluginServices:
    """What the bot lends its plugins; built once per bot (see ``core.app``)."""

    bot: str = "bot"
    store: BucketStore = field(default_factory=default_store)
    memory: MemoryStore | None = None
    generator: Generator | None = None
    moderator: Moderator | None = None
    base_dir: Path = field(default_factory=Path.cwd)  # the bot file's folder
    conversation_ttl: float = 7 * 24 * 3600.0
    window: int = 20  # turns memory keeps per conversation
    admins: Mapping[str, Sequence[str]] = field(default_factory=dict)
    outbox: Outbox = field(default_factory=Outbox)
    forgetting: Forgetting = field(default_factory=Forgetting)
    metrics: Metrics | None = None

    def __post_init__(self) -> None:
        self.pauses = Pauses(self.store, self.bot)
        self.accounts = Accounts(self.store)

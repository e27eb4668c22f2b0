"""Conversation memory in Redis: for production, and for several processes serving one bot.

Key layout (``{p}`` is ``memory.key_prefix``; the bot name and every id are
percent-encoded, so a ``:`` inside an id cannot make two keys collide; ``{ref}`` is
``{channel}:{conversation_id}`` and ``{who}`` is ``{channel}:{user_id}``)::

    {p}:{bot}:conv:{ref}         list  the window of turns, JSON, oldest first
    {p}:{bot}:ver:{ref}          string  the window's version, for front ends' caches
    {p}:{bot}:members:{ref}      hash  user id -> that user's index key, for each user
                                       whose turns (or replies) are kept
    {p}:{bot}:seen:{ref}         zset  message id -> end of its dedupe window (ms)
    {p}:{bot}:replies:{ref}      hash  message id -> pending mark or stored reply
    {p}:{bot}:seenby:{ref}       zset  user id -> end of their newest dedupe window (ms)
    {p}:{bot}:lease:{ref}        string  the token of the front end answering now
    {p}:{bot}:queue:{ref}        zset  tokens of front ends waiting, by arrival (ms)
    {p}:{bot}:beats:{ref}        zset  the same tokens, by when they last asked (ms)
    {p}:{bot}:facts:{who}        hash  facts about a user; no TTL, gone on forget_user
    {p}:{bot}:user:{who}:convs   set   refs of the conversations holding the user's data

A conversation, its version, its members hash and the index of every member get the
same TTL, set together (on an append or a load) once a tenth of the TTL, at most a
minute, has run down, and at once on a key just made, so an index outlives every
conversation it points to and ``forget_user`` finds them all. Dedupe records live for
the redelivery window (``memory.dedupe_window``, at most ``memory.dedupe_max`` ids per
conversation); the lease and queue for a lease (``memory.lease``).

Each front end keeps the windows it read last (:class:`WindowCache`), and ``begin``
sends the version it holds: Redis answers with only the turns pushed since (none, when
this front end wrote them itself), or the whole window when the version is unknown to
it (another epoch: a reset, a forget, an expiry, a writer that kept no version).

Every call is one round trip: one command, or one Lua script (:mod:`core.memory.redis_scripts`),
written with the store's settings (a store of other settings loads scripts of its own).
The scripts touch keys they derive from stored data, and the per-message ones name their
keys from the prefix and the conversation (fewer arguments to encode per message), which
a standalone Redis (or a replicated one) allows and Redis Cluster does not.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

from core import jsoncodec
from core.config import BotSettings, MemorySection
from core.errors import MemoryUnavailable
from core.memory import redis_scripts as lua
from core.memory.base import WAIT, Begun, MemorySnapshot, StoredReply, UserRef
from core.redis_client import RedisHub, RedisService, key_part, redact, reply_pairs, reply_text
from core.types import ConversationKey, Turn

log = logging.getLogger(__name__)

# A front end waiting for a lease asks again at least this often; one silent for
# STALE_WAITER_MS has gone and leaves the queue.
STALE_WAITER_MS = 2000

# Scripts safe to run twice (keyed by a token or a message id, or read-only): after a
# connection broke mid-call they are sent again on a fresh connection.
_IDEMPOTENT = frozenset({"load", "begin", "finish", "abort", "renew", "reset", "forget_user"})


class RedisMemory(RedisService):
    """A :class:`~core.memory.base.MemoryStore` on Redis (``redis://`` or ``unix://``).

    Every Redis failure is raised as :class:`~core.errors.MemoryUnavailable`. Only the
    idempotent calls are retried, once, when their connection broke (a Redis restart
    leaves every pooled connection stale); ``append`` and ``set_fact`` are not.
    """

    def __init__(self, section: MemorySection, *, source: str = "<memory>",
                 cache_size: int = 2048, redis: RedisHub | None = None) -> None:
        self.section = section
        self.source = source
        self._windows = WindowCache(section.window, cache_size)
        scripts = lua.sources(lua.Settings(
            lease_ms=int(section.lease * 1000), stale_ms=STALE_WAITER_MS,
            window=section.window, ttl=section.ttl,
            # A load refreshes the conversation's TTL once this much of it has run down.
            slack_ms=min(60_000, int(section.ttl * 100)),
            dedupe_ms=int(section.dedupe_window * 1000), dedupe_max=section.dedupe_max))
        # Its own connections unless the app shares a process's (share_redis).
        super().__init__(section.url, scripts, timeout=section.timeout,
                         setting=f"{source}: memory.url", error=MemoryUnavailable,
                         failing=f"redis at {redact(section.url)}", retry=_IDEMPOTENT, redis=redis)

    def _base(self, bot: str) -> str:
        return f"{self.section.key_prefix}:{key_part(bot)}:"

    @staticmethod
    def _ref(key: ConversationKey) -> str:
        return f"{key_part(key.channel)}:{key_part(key.conversation_id)}"

    def _who(self, user: UserRef) -> str:
        return f"{self._base(user.bot)}{{}}:{key_part(user.channel)}:{key_part(user.user_id)}"

    def _index(self, user: UserRef) -> str:
        return self._who(user).format("user") + ":convs"

    def _facts(self, user: UserRef) -> str:
        return self._who(user).format("facts")

    def _keys(self, key: ConversationKey, *kinds: str) -> list[str]:
        base, ref = self._base(key.bot), self._ref(key)
        return [f"{base}{kind}:{ref}" for kind in kinds]

    def _load_keys(self, key: ConversationKey, user_id: str) -> list[str]:
        user = UserRef(key.bot, key.channel, user_id)
        return [*self._keys(key, "conv", "members"), self._facts(user)]

    async def begin(
        self, key: ConversationKey, message_id: str, user_id: str, token: str
    ) -> Begun:
        """Claim the conversation for ``message_id`` in one round trip; see the protocol."""
        base, ref = self._base(key.bot), self._ref(key)
        facts = f"{base}facts:{key_part(key.channel)}:{key_part(user_id)}"
        where = base + ref
        cached = self._windows.get(where)
        reply = await self._run(
            "begin", (),
            [base, ref, facts, message_id, token, "?" if cached is None else cached.version],
        )
        if reply[0] == 1:
            # Flat: 1, version, length, tail?, n, n turns, the facts' names and values.
            n = reply[4]
            turns = self._windows.update(where, cached, reply[1], reply[2], reply[3],
                                         reply[5:5 + n], key)
            return Begun(snapshot=MemorySnapshot(turns, reply_pairs(reply[5 + n:])))
        if reply[0] == 2:
            try:
                return Begun(replay=StoredReply.loads(reply[1]))
            except ValueError:
                log.warning("memory: unreadable stored reply for message %s in %s",
                            _digest(message_id), key)
                raise MemoryUnavailable(f"{key}: the stored reply is unreadable") from None
        return WAIT

    async def finish(
        self, key: ConversationKey, message_id: str, user_id: str, token: str,
        turns: Sequence[Turn], reply: StoredReply,
    ) -> None:
        """Store ``turns`` and the reply, release the lease: one atomic round trip."""
        base, ref = self._base(key.bot), self._ref(key)
        # The message's user is indexed even when no turn is stored (a command's answer
        # is kept in the dedupe record), so forget_user finds it.
        args = [base, ref, message_id, token, "d:" + reply.dumps(), user_id,
                *self._turn_args(key, turns, user_id)]
        stored = await self._run("finish", (), args)
        if stored[0] == 1 and turns:
            self._windows.pushed(base + ref, stored[1], stored[2], stored[3], turns)

    async def abort(self, key: ConversationKey, message_id: str, token: str) -> None:
        """Release the pending id, the lease and a place in the queue held by ``token``."""
        await self._run("abort", (), [self._base(key.bot), self._ref(key), message_id, token])

    async def renew(self, key: ConversationKey, message_id: str, token: str) -> bool:
        """Extend the lease and the pending mark; False if the lease was lost."""
        held = await self._run("renew", (), [self._base(key.bot), self._ref(key), message_id,
                                             token])
        return bool(held)

    async def load(self, key: ConversationKey, user_id: str) -> MemorySnapshot:
        """The last ``window`` turns and the user's facts; refreshes the TTL."""
        keys = [*self._keys(key, "conv", "members", "ver"),
                self._facts(UserRef(key.bot, key.channel, user_id))]
        reply = await self._run("load", keys, ())
        n = reply[3]  # flat: version, length, 0, n, n turns, the facts' names and values
        turns = tuple(t for t in _decoded(reply[4:4 + n], key) if t is not None)
        return MemorySnapshot(turns, reply_pairs(reply[4 + n:]))

    def _turn_args(
        self, key: ConversationKey, turns: Sequence[Turn], extra_user: str | None = None
    ) -> list[Any]:
        # Per user: their index key, and whether one of their turns stays in the window
        # (the script then needs not look for them in it).
        fresh = {t.user_id for t in turns[-self.section.window:] if t.user_id is not None}
        users = {t.user_id for t in turns if t.user_id is not None}
        if extra_user:
            users.add(extra_user)
        args: list[Any] = [len(users)]
        for user in sorted(users):
            args += [user, self._index(UserRef(key.bot, key.channel, user)),
                     1 if user in fresh else 0]
        args += [jsoncodec.dumpb(t.to_dict()) for t in turns]
        return args

    async def append(self, key: ConversationKey, turns: Sequence[Turn]) -> None:
        """Add ``turns`` and trim to the window, atomically, in one round trip."""
        if not turns:
            return
        await self._run("append", self._keys(key, "conv", "members", "seenby", "ver"),
                        [self._ref(key), secrets.token_hex(8), *self._turn_args(key, turns)])

    async def reset(self, key: ConversationKey) -> None:
        """Delete the conversation's turns (its dedupe record stays)."""
        await self._run("reset", self._keys(key, "conv", "members", "ver"), [self._ref(key)])
        self._windows.drop(self._base(key.bot) + self._ref(key))

    async def set_fact(self, user: UserRef, name: str, value: str) -> None:
        """Store ``name = value`` in the user's facts."""
        async with self._failures("set_fact"), asyncio.timeout(self.section.timeout):
            await self._redis.hset(self._facts(user), name, value)

    async def conversations(self, user: UserRef) -> list[ConversationKey]:
        """See :meth:`MemoryStore.conversations` (the user's index)."""
        async with self._failures("conversations"), asyncio.timeout(self.section.timeout):
            refs = await self._redis.smembers(self._index(user))
        keys = []
        for ref in sorted(reply_text(r) for r in refs):
            channel, _, conversation = ref.partition(":")
            keys.append(ConversationKey(user.bot, unquote(channel), unquote(conversation)))
        return keys

    async def forget_user(self, user: UserRef) -> int:
        """Delete the user's facts and every conversation holding their data.

        Returns the number of conversations plus the number of facts deleted.
        """
        count = await self._run("forget_user", [self._index(user), self._facts(user)],
                                [self._base(user.bot)])
        # Nothing of theirs stays in this process either (the cache is checked against
        # Redis before use, so this is for their privacy, not for correctness).
        self._windows.clear()
        return int(count)


class _Window:
    """A conversation's window as this front end last read or wrote it."""

    __slots__ = ("clean", "items", "turns", "version")

    def __init__(self, version: str, items: list[Turn | None], clean: bool) -> None:
        self.version = version
        self.items = items  # one per stored turn, None for a malformed one
        self.clean = clean  # no None among them
        self.turns: tuple[Turn, ...] = (tuple(items) if clean  # type: ignore[arg-type]
                                        else tuple(t for t in items if t is not None))


class WindowCache:
    """The windows of the ``size`` conversations used last, each with its version in
    Redis (see :mod:`core.memory.redis_scripts`): a front end decodes only the turns
    pushed since it last looked, and none of those it pushed itself."""

    def __init__(self, window: int, size: int) -> None:
        self.window = window
        self.size = size
        self._entries: dict[str, _Window] = {}

    def get(self, where: str) -> _Window | None:
        """The cached window of conversation ``where``, if any."""
        return self._entries.get(where)

    def update(self, where: str, cached: _Window | None, version: bytes, length: int,
               tail: int, raw: Sequence[bytes], key: ConversationKey) -> tuple[Turn, ...]:
        """The window after a load that sent ``cached``'s version and got ``raw`` (the
        turns since, when ``tail``; else the whole window) at ``version``."""
        current = version.decode()
        new = _decoded(raw, key)
        clean = None not in new
        if tail and cached is not None:
            if not raw:
                self._touch(where, cached)
                return cached.turns
            items = cached.items + new
            clean = clean and cached.clean
        else:
            items = new
        if self._trim(items, length):
            clean = clean or None not in items
        entry = _Window(current, items, clean)
        if current == "?":
            self._entries.pop(where, None)  # written by something that kept no version
        else:
            self._touch(where, entry)
        return entry.turns

    def pushed(self, where: str, before: bytes, after: bytes, length: int,
               turns: Sequence[Turn]) -> None:
        """``turns`` were pushed onto version ``before`` of the window, making it
        ``after``: the cached window follows if it was ``before``."""
        cached = self._entries.get(where)
        if cached is None:
            return
        if cached.version != before.decode():
            del self._entries[where]
            return
        items: list[Turn | None] = [*cached.items, *turns]
        self._trim(items, length)
        self._entries[where] = _Window(after.decode(), items,
                                       cached.clean or None not in items)

    def drop(self, where: str) -> None:
        """Forget the window of ``where``."""
        self._entries.pop(where, None)

    def clear(self) -> None:
        """Forget every window."""
        self._entries.clear()

    def _trim(self, items: list[Turn | None], length: int) -> bool:
        """Keep the last of ``items`` that a window of ``length`` stored turns holds;
        whether any went."""
        keep = min(self.window, length)
        if len(items) <= keep:
            return False
        del items[:len(items) - keep]
        return True

    def _touch(self, where: str, entry: _Window) -> None:
        entries = self._entries
        entries.pop(where, None)
        entries[where] = entry
        if len(entries) > self.size:
            del entries[next(iter(entries))]


def _decoded(raw_turns: Sequence[bytes], key: ConversationKey) -> list[Turn | None]:
    turns: list[Turn | None] = []
    for raw in raw_turns:
        try:
            turns.append(Turn.from_dict(jsoncodec.loads(raw)))
        except (ValueError, TypeError, AttributeError):
            # A hash and a length, never the stored text: logs outlive forget_user.
            log.warning("memory: skipping a malformed turn in %s: %d bytes, sha256 %s",
                        key, len(raw), _digest(raw))
            turns.append(None)
    return turns


def _digest(value: bytes | str) -> str:
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()[:16]


def create(settings: BotSettings) -> RedisMemory:
    """The ``redis`` memory backend for ``settings`` (entry point ``parley.memory``)."""
    return RedisMemory(settings.memory, source=settings.source)

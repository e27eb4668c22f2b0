"""What an NPC keeps about one player: the relationship value and facts it learned.

Kept in the plugin's per-user storage (Redis with the Redis memory, so it survives
restarts and is shared by every front end; ``/forget`` deletes it): per NPC, a field
``NPC/relationship`` with the value, which lines move with one atomic, clamped increment,
and a field ``NPC/facts`` with the facts, which lines extend in one atomic step, so two
lines finishing together both count. (A field ``NPC`` with both is the older layout,
still read.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.plugin_services import Bucket
from core.plugins import Plugin

LOW, HIGH = -100, 100


def clamp(value: int) -> int:
    """``value`` within the relationship's range."""
    return max(LOW, min(HIGH, value))


@dataclass(frozen=True, slots=True)
class PlayerState:
    """One (NPC, player) pair's state."""

    relationship: int = 0
    facts: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """As JSON for storage and the API."""
        return {"relationship": self.relationship, "facts": list(self.facts)}

    @classmethod
    def from_dict(cls, raw: Any) -> PlayerState:
        """From what :meth:`to_dict` stored (anything else: a fresh state)."""
        if not isinstance(raw, dict):
            return cls()
        value = raw.get("relationship", 0)
        facts = raw.get("facts", [])
        return cls(clamp(int(value)) if isinstance(value, int) else 0,
                   tuple(str(f) for f in facts) if isinstance(facts, list) else ())


class Players:
    """Player states of every NPC of a bot."""

    def __init__(self, plugin: Plugin, channel: str, max_facts: int) -> None:
        self._plugin = plugin
        self._channel = channel
        self._max_facts = max_facts

    def _bucket(self, player: str) -> Bucket:
        return self._plugin.storage.user(self._channel, player)

    async def get(self, npc: str, player: str) -> PlayerState:
        """The state of ``player`` with ``npc`` (fresh if none is kept)."""
        values = await self._bucket(player).items()
        state = PlayerState.from_dict(values.get(npc))  # the older layout, if any
        value = values.get(_relationship(npc))
        facts = values.get(_facts(npc))
        return PlayerState(
            clamp(value) if isinstance(value, int) else state.relationship,
            tuple(str(f) for f in facts) if isinstance(facts, list) else state.facts)

    async def put(self, npc: str, player: str, state: PlayerState) -> PlayerState:
        """Replace the state (the relationship clamped, facts capped); returns what is kept."""
        kept = PlayerState(clamp(state.relationship), state.facts[-self._max_facts:])
        await self._bucket(player).update({_relationship(npc): kept.relationship,
                                           _facts(npc): list(kept.facts)})
        return kept

    async def reset(self, npc: str, player: str) -> None:
        """Forget ``player``'s state with ``npc``."""
        await self._bucket(player).delete(npc, _relationship(npc), _facts(npc))

    async def moved(self, npc: str, player: str, change: int,
                    facts: tuple[str, ...]) -> PlayerState:
        """Apply what a line changed: the relationship moved and new facts learned, each in
        one atomic step, so a line finishing at the same moment never undoes this one's."""
        state = await self.get(npc, player)  # the start values, if the fields are absent
        bucket = self._bucket(player)
        relationship, kept = state.relationship, state.facts
        if change:
            relationship = await bucket.incr(_relationship(npc), change, bounds=(LOW, HIGH),
                                             start=state.relationship)
        if facts:
            kept = tuple(await bucket.extend(_facts(npc), facts, cap=self._max_facts,
                                             start=state.facts))
        return PlayerState(relationship, kept)


def _relationship(npc: str) -> str:
    """The field of ``npc``'s relationship value (an NPC id, a file's stem, has no ``/``)."""
    return f"{npc}/relationship"


def _facts(npc: str) -> str:
    """The field of the facts ``npc`` learned about the player."""
    return f"{npc}/facts"

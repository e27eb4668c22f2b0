"""What an NPC keeps about one player: the relationship value and facts it learned.

Kept in the plugin's per-user storage (Redis with the Redis memory, so it survives
restarts and is shared by every front end; ``/forget`` deletes it): per NPC, a field
``NPC`` with the facts and a field ``NPC/relationship`` with the value, which lines move
with one atomic, clamped increment (two lines finishing together both count).
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
        # Before the relationship had a field of its own it was kept with the facts.
        state = PlayerState.from_dict(values.get(npc))
        value = values.get(_relationship(npc))
        if isinstance(value, int):
            state = PlayerState(clamp(value), state.facts)
        return state

    async def put(self, npc: str, player: str, state: PlayerState) -> PlayerState:
        """Replace the state (the relationship clamped, facts capped); returns what is kept."""
        kept = PlayerState(clamp(state.relationship), state.facts[-self._max_facts:])
        await self._bucket(player).update({npc: kept.to_dict(),
                                           _relationship(npc): kept.relationship})
        return kept

    async def reset(self, npc: str, player: str) -> None:
        """Forget ``player``'s state with ``npc``."""
        await self._bucket(player).delete(npc, _relationship(npc))

    async def moved(self, npc: str, player: str, change: int,
                    facts: tuple[str, ...]) -> PlayerState:
        """Apply what a line changed: the relationship moved (atomically, so a line
        finishing at the same moment never undoes this one's change), new facts learned."""
        state = await self.get(npc, player)
        bucket = self._bucket(player)
        relationship = state.relationship
        if change:
            relationship = await bucket.incr(_relationship(npc), change, bounds=(LOW, HIGH),
                                             start=state.relationship)
        new_facts = tuple(f for f in facts if f not in state.facts)
        if not new_facts:
            return PlayerState(relationship, state.facts)
        # Facts are still read, extended and written: two lines that both teach the NPC
        # something at the same moment can keep only one of them.
        kept = (state.facts + new_facts)[-self._max_facts:]
        # The relationship written beside them only counts while its own field is absent
        # (a state kept before that field existed).
        await bucket.set(npc, PlayerState(relationship, kept).to_dict())
        return PlayerState(relationship, kept)


def _relationship(npc: str) -> str:
    """The field of ``npc``'s relationship value (an NPC id, a file's stem, has no ``/``)."""
    return f"{npc}/relationship"

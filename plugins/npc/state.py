"""What an NPC keeps about one player: the relationship value and facts it learned.

Kept in the plugin's per-user storage (Redis with the Redis memory, so it survives
restarts and is shared by every front end; ``/forget`` deletes it), one field per NPC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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

    def _bucket(self, player: str) -> Any:
        return self._plugin.storage.user(self._channel, player)

    async def get(self, npc: str, player: str) -> PlayerState:
        """The state of ``player`` with ``npc`` (fresh if none is kept)."""
        return PlayerState.from_dict(await self._bucket(player).get(npc))

    async def put(self, npc: str, player: str, state: PlayerState) -> PlayerState:
        """Replace the state (the relationship clamped, facts capped); returns what is kept."""
        kept = PlayerState(clamp(state.relationship), state.facts[-self._max_facts:])
        await self._bucket(player).set(npc, kept.to_dict())
        return kept

    async def reset(self, npc: str, player: str) -> None:
        """Forget ``player``'s state with ``npc``."""
        await self._bucket(player).delete(npc)

    async def moved(self, npc: str, player: str, change: int,
                    facts: tuple[str, ...]) -> PlayerState:
        """Apply what a line changed: the relationship moved, new facts learned."""
        state = await self.get(npc, player)
        if not change and not facts:
            return state
        new_facts = state.facts + tuple(f for f in facts if f not in state.facts)
        return await self.put(npc, player, PlayerState(state.relationship + change, new_facts))

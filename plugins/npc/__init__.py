"""NPCs for games: character cards, lorebooks, per-player memory and an HTTP API.

``[plugins.npc] cards = "DIR"`` makes every card file in DIR (V2/V3 JSON, PNG with a
``chara``/``ccv3`` chunk, or TOML) an NPC whose id is the file's stem; ``world`` names an
optional lorebook all NPCs share. Games talk to NPCs over the web channel's server
(:mod:`plugins.npc.api` over HTTP, :mod:`plugins.npc.socket` over a WebSocket;
docs/npc.md); each (NPC, player) pair is a conversation of the bot's memory, with a
relationship value and facts kept in the plugin's storage.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.plugins import AddContext, Plugin
from core.types import IncomingMessage
from plugins.npc import api, prompt, socket
from plugins.npc.cards import Card, LoreEntry, load_cards, load_lorebook
from plugins.npc.lore import select
from plugins.npc.state import Players

NAME = "npc"
DEFAULT_EMOTIONS = ["neutral", "happy", "sad", "angry", "afraid", "surprised"]


class Config(BaseModel):
    """``[plugins.npc]``."""

    model_config = ConfigDict(extra="forbid")

    cards: str = Field(min_length=1)  # a folder of card files, relative to the bot file
    world: str | None = None  # a shared lorebook (character_book JSON or TOML)
    emotions: list[str] = Field(default_factory=lambda: list(DEFAULT_EMOTIONS), min_length=1)
    lore_tokens: int = Field(default=400, ge=0)  # when a book sets no token_budget
    scan_depth: int = Field(default=4, ge=0)  # recent turns scanned for lore keys
    max_recursion: int = Field(default=2, ge=0)
    max_step: int = Field(default=10, ge=0, le=200)  # how far one line moves the relationship
    max_facts: int = Field(default=20, ge=0)  # per player, and of world facts
    channel: str = "npc"  # the channel NPC conversations are kept under


class Village:
    """The NPCs of one bot and what they need to speak."""

    def __init__(self, plugin: Plugin, config: Config) -> None:
        self.plugin = plugin
        self.config = config
        self.cards: dict[str, Card] = load_cards(plugin.path(config.cards))
        self.world: list[LoreEntry] = (
            load_lorebook(plugin.path(config.world)).entries if config.world else [])
        self.players = Players(plugin, config.channel, config.max_facts)

    def _world(self, tenant: str | None) -> Any:
        return self.plugin.storage.bucket(f"world:{tenant or ''}")

    async def world_facts(self, tenant: str | None) -> list[str]:
        """What the game (of ``tenant``) told every NPC, oldest first."""
        facts = await self._world(tenant).get("facts", [])
        return [str(f) for f in facts] if isinstance(facts, list) else []

    async def publish(self, tenant: str | None, facts: list[str], *,
                      replace: bool = False) -> list[str]:
        """Add (or with ``replace``, set) world facts; the newest ``max_facts`` are kept."""
        old = [] if replace else await self.world_facts(tenant)
        kept = [*old, *(f for f in facts if f not in old)][-self.config.max_facts:]
        await self._world(tenant).set("facts", kept)
        return kept

    def emotions(self, npc: str) -> list[str]:
        """The emotions ``npc`` may show (its card's, else the configured set)."""
        return self.cards[npc].extras.emotions or self.config.emotions

    def actions(self, npc: str) -> list[str]:
        """``npc``'s allow-list of actions."""
        return self.cards[npc].extras.actions

    def lore(self, npc: str, scanned: str) -> str:
        """The lore ``scanned`` triggers from the NPC's own book and the world's."""
        card = self.cards[npc]
        book = card.character_book
        entries = [*(book.entries if book else []), *self.world]
        budget = book.token_budget if book and book.token_budget is not None else (
            self.config.lore_tokens)
        recursive = book.recursive_scanning if book and book.recursive_scanning is not None \
            else True
        return select(entries, scanned, budget=budget, max_recursion=self.config.max_recursion,
                      recursive=recursive).text

    async def instructions(self, message: IncomingMessage) -> str | None:
        """The system text for a message to an NPC (None for other messages)."""
        npc = message.metadata.get("npc")
        if npc not in self.cards:
            return None
        state: dict[str, Any] = json.loads(message.metadata.get("game_state") or "{}")
        memory = self.plugin.services.memory
        recent: list[str] = []
        if memory is not None and self.config.scan_depth:
            turns = (await memory.load(message.key, message.user_id)).turns
            recent = [t.text for t in turns[-self.config.scan_depth:]]
        scanned = "\n".join([*recent, message.text, prompt.game_state_text(state)])
        player = await self.players.get(npc, message.user_id)
        news = await self.world_facts(message.metadata.get("tenant"))
        return prompt.build(
            self.cards[npc], player=_addressed(message.metadata.get("player", "")),
            lore="\n".join([self.lore(npc, scanned), *news]).strip(), game_state=state,
            relationship=player.relationship, facts=player.facts,
            emotions=self.emotions(npc), actions=self.actions(npc),
            max_step=self.config.max_step)

    def post_history(self, message: IncomingMessage) -> str | None:
        """The card's post-history instructions for a message to an NPC (None if none)."""
        npc = message.metadata.get("npc")
        if npc not in self.cards:
            return None
        text = prompt.post_history(
            self.cards[npc], player=_addressed(message.metadata.get("player", "")))
        return text or None


def setup(registry: Plugin, config: Config) -> None:
    """Load the cards and lore, add the NPC context and the game API."""
    village = Village(registry, config)

    async def npc_context(message: IncomingMessage) -> AddContext | None:
        text = await village.instructions(message)
        return AddContext(text) if text else None

    async def npc_post_history(message: IncomingMessage) -> AddContext | None:
        text = village.post_history(message)
        return AddContext(text, after_history=True) if text else None

    registry.add_context_provider(npc_context)
    registry.add_context_provider(npc_post_history)
    socket.install(registry, api.install(registry, village))


def _addressed(player: str) -> str:
    """How the prompt names the player (a bark, ``:bark``, has none)."""
    return player if player and not player.startswith(":") else "the people around"

"""The NPC's instructions for one line: card, triggered lore, game state, the player;
and the card's post-history instructions, which go after the conversation's history.

The model is asked to end its line with tags the game can act on
(``[emotion: X]``, ``[action: Y]``, ``[relationship: +N]``, ``[fact: ...]``);
:mod:`plugins.npc.reply` reads them back and checks them against the allow-lists.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from plugins.npc.cards import Card


def substitute(text: str, char: str, user: str) -> str:
    """Card macros: ``{{char}}`` is the NPC, ``{{user}}`` the player (also ``<BOT>``/``<USER>``)."""
    for macro, value in (("{{char}}", char), ("<BOT>", char), ("{{user}}", user),
                         ("<USER>", user)):
        text = text.replace(macro, value)
    return text


def game_state_text(state: Mapping[str, Any]) -> str:
    """The game state as lines ``key: value`` (nested values as compact JSON)."""
    lines = []
    for key, value in state.items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        lines.append(f"{key}: {shown}")
    return "\n".join(lines)


def build(card: Card, *, player: str, lore: str, game_state: Mapping[str, Any],
          relationship: int, facts: Sequence[str], emotions: Sequence[str],
          actions: Sequence[str], max_step: int) -> str:
    """The system text of one NPC line."""
    name = card.name

    def sub(text: str) -> str:
        return substitute(text, name, player).strip()

    parts = [sub(card.system_prompt) or (
        f"You are {name}, a character in a game. Stay in character; answer with what "
        f"{name} says, in one to three sentences.")]
    for title, text in (("Description", card.description), ("Personality", card.personality),
                        ("Scenario", card.scenario),
                        ("How you usually greet someone", card.first_mes),
                        ("Examples of how you speak", card.mes_example)):
        if text.strip():
            parts.append(f"{title}:\n{sub(text)}")
    if lore:
        parts.append(f"What you know about the world:\n{lore}")
    if game_state:
        parts.append(f"The game now:\n{game_state_text(game_state)}")
    feeling = ("friendly" if relationship > 20 else "hostile" if relationship < -20
               else "neutral")
    parts.append(f"Your relationship with {player}: {relationship} (from -100 to 100; "
                 f"{feeling}).")
    if facts:
        parts.append(f"What you know about {player}:\n" + "\n".join(f"- {f}" for f in facts))
    rules = [f"End your line with [emotion: E], E one of: {', '.join(emotions)}."]
    if actions:
        rules.append(f"If you do something, add [action: A], A one of: {', '.join(actions)}; "
                     "no other actions exist.")
    rules.append(f"If {player}'s words change how you feel about them, add "
                 f"[relationship: +N] or [relationship: -N] (N at most {max_step}); if you "
                 f"learn something about {player}, add [fact: what you learned].")
    parts.append(" ".join(rules))
    return "\n\n".join(parts)


def post_history(card: Card, *, player: str) -> str:
    """The card's ``post_history_instructions``, for after the history ("" if none)."""
    return substitute(card.post_history_instructions, card.name, player).strip()

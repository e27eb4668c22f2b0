"""The chat a bot's generator continues: persona, plugin context, facts, history, message.

The generator owns the model's prompt format (chat template or transcript) and trims
the oldest history to fit; this module decides what the chat says and in which order:

1. one system message: the persona, plugin context meant as instructions, and the facts
   the bot knows about the user;
2. context in the user's own words (custom instructions), as a user turn the bot
   acknowledges: it is never taken for system text;
3. the bot's example exchanges (``[bot] examples``, few-shot turns showing how the
   persona answers), then the conversation's stored turns, then the new message; when
   the chat is too long for the model, the generator drops the oldest turns first, so
   examples go before any of the conversation does;
4. context meant to come *after* the history (a character card's
   ``post_history_instructions``, as the Character Card V2 spec says): it ends the
   newest user message, so it is the last thing the model reads before it answers,
   whatever the model's format (a system message there would be moved to the top by
   transcript prompts and refused by templates that require alternating roles).
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Mapping, Sequence

from core.generation.base import ChatMessage
from core.plugins import AddContext
from core.types import Turn

ACKNOWLEDGED = "Understood."


def chat_messages(
    persona: str,
    contexts: Sequence[AddContext],
    facts: Mapping[str, str],
    turns: Sequence[Turn],
    text: str,
    examples: Sequence[tuple[str, str]] = (),
    *,
    history: Sequence[ChatMessage] | None = None,
) -> list[ChatMessage]:
    """The messages of one request, in the order the module docstring gives.

    ``history`` is ``turns`` as chat messages, when the caller has them already
    (:class:`HistoryMessages`).
    """
    system = [persona]
    system += [c.text for c in contexts if c.role == "system" and not c.after_history]
    if facts:
        known = "; ".join(f"{k}: {v}" for k, v in sorted(facts.items()))
        system.append(f"What you know about this user: {known}")
    messages = [ChatMessage("system", "\n\n".join(s for s in system if s))]
    for context in contexts:
        if context.role == "user" and not context.after_history:
            messages += [ChatMessage("user", context.text),
                         ChatMessage("assistant", ACKNOWLEDGED)]
    for asked, answered in examples:
        messages += [ChatMessage("user", asked), ChatMessage("assistant", answered)]
    if history is None:
        history = [ChatMessage(t.role, t.text) for t in turns if t.role != "system"]
    messages += history
    after = [c.text for c in contexts if c.after_history]
    messages.append(ChatMessage("user", "\n\n".join([text, *after])))
    return messages


class HistoryMessages:
    """The stored turns of conversations as chat messages, remembered per conversation.

    A memory store hands back the same :class:`Turn` objects for the turns a window
    kept, so each turn is converted once instead of on every message (a frozen
    dataclass per turn per message: a tenth of the engine's time with a 20-turn window).
    Turns are immutable, so one seen before converts as it did then.
    """

    def __init__(self, size: int = 2048) -> None:
        self.size = size  # conversations remembered, the least recently used go first
        self._entries: dict[Hashable, tuple[Sequence[Turn], tuple[ChatMessage | None, ...]]] = {}

    def __call__(self, conversation: Hashable, turns: Sequence[Turn]) -> list[ChatMessage]:
        """``turns`` (of ``conversation``) as chat messages, system turns left out."""
        entries = self._entries
        entry = entries.pop(conversation, None)
        if entry is None:
            converted = tuple(map(_message, turns))
        elif entry[0] is turns:
            converted = entry[1]
        else:
            converted = _converted(turns, *entry)
        entries[conversation] = (turns, converted)
        if len(entries) > self.size:
            del entries[next(iter(entries))]
        return [m for m in converted if m is not None]


def _converted(
    turns: Sequence[Turn], old: Sequence[Turn], old_converted: tuple[ChatMessage | None, ...]
) -> tuple[ChatMessage | None, ...]:
    """``turns`` converted, reusing what ``old`` (an earlier window) converted: usually
    ``turns`` is ``old`` less its oldest turns plus new ones."""
    if turns and old:
        first = turns[0]
        for start, turn in enumerate(old):
            if turn is first:
                kept = len(old) - start
                if kept <= len(turns) and all(map(operator.is_, old[start:], turns[:kept])):
                    return old_converted[start:] + tuple(map(_message, turns[kept:]))
                break
    # By identity: the turns held in the entry are alive, so no id is reused.
    known = dict(zip(map(id, old), old_converted, strict=True))
    return tuple(known.get(id(t)) or _message(t) for t in turns)


def _message(turn: Turn) -> ChatMessage | None:
    return None if turn.role == "system" else ChatMessage(turn.role, turn.text)


def instructions(text: str, messages: Sequence[ChatMessage]) -> str:
    """What the bot was told and must never recite: the system messages, and any text
    placed after the user's own words (``text``) in the last turn (post-history
    instructions)."""
    parts = [m.content for m in messages if m.role == "system"]
    last = messages[-1] if messages else None
    if last is not None and last.role == "user" and last.content.startswith(text):
        parts.append(last.content[len(text):].strip())
    return "\n\n".join(p for p in parts if p)

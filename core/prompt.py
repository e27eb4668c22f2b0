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

from collections.abc import Mapping, Sequence

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
) -> list[ChatMessage]:
    """The messages of one request, in the order the module docstring gives."""
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
    messages += [ChatMessage(t.role, t.text) for t in turns if t.role != "system"]
    after = [c.text for c in contexts if c.after_history]
    messages.append(ChatMessage("user", "\n\n".join([text, *after])))
    return messages

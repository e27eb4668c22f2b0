"""Chat messages to model input ids, trimmed to fit the model's context.

Instruction-tuned models get their tokenizer's chat template. Base models get a plain
transcript (the persona, then ``User: ...`` / ``Assistant: ...`` lines ending with
``Assistant:``) and stop as soon as they start the next speaker's line. When the chat is
too long, the oldest turns go first; the system message and the newest user message
always stay, the latter cut from the front if even it alone is too long.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from core.generation.base import ChatMessage

PromptFormat = Literal["chat", "transcript"]

USER_LABEL = "User"
ASSISTANT_LABEL = "Assistant"

# A CPU takes seconds per thousand prompt tokens on even a small model; a longer history
# would make every reply slow without making it much better.
CPU_CONTEXT_CAP = 2048
ACCELERATOR_CONTEXT_CAP = 8192


@dataclass(frozen=True, slots=True)
class Prompt:
    """Input ids for one request, and how much of the chat had to go to fit."""

    ids: list[int]
    dropped: int = 0
    truncated: bool = False


def context_window(configured: int | None, max_positions: int, device: str) -> int:
    """Tokens of context to use: the setting, else the model's length capped by device."""
    if configured is not None:
        return min(configured, max_positions)
    cap = CPU_CONTEXT_CAP if device == "cpu" else ACCELERATOR_CONTEXT_CAP
    return min(max_positions, cap)


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Tokens the prompt may use; a huge ``max_new_tokens`` never squeezes it below 1/4."""
    return max(context - max_new_tokens, context // 4, 1)


def transcript_stops(
    user_label: str = USER_LABEL, assistant_label: str = ASSISTANT_LABEL
) -> tuple[str, ...]:
    """Stop strings for the transcript format: a new speaker line, or a blank line.

    Every turn of a transcript is one paragraph, so a blank line means the model has left
    the dialogue (base models go on to invent headings, lists or another persona).
    """
    return (f"\n{user_label}:", f"\n{assistant_label}:", "\n\n")


def transcript(
    messages: Sequence[ChatMessage],
    user_label: str = USER_LABEL,
    assistant_label: str = ASSISTANT_LABEL,
) -> str:
    """The chat as a plain-text dialogue ending with the assistant's label."""
    labels = {"user": user_label, "assistant": assistant_label}
    persona = "\n\n".join(m.content.strip() for m in messages if m.role == "system")
    lines = [f"{labels[m.role]}: {m.content.strip()}" for m in messages if m.role != "system"]
    lines.append(f"{assistant_label}:")
    dialogue = "\n".join(lines)
    return f"{persona}\n\n{dialogue}" if persona else dialogue


# Breaks a control token's text so the tokenizer reads it as plain characters.
_BREAK = "\u200b"  # zero-width space
# Every control token of the common chat formats holds one of these characters; text
# without them needs no scan of the tokenizer's added tokens.
_CONTROL_MARKS = ("<", "[", "|")


def control_tokens(tokenizer: Any) -> frozenset[str]:
    """The texts the tokenizer turns into special (control) tokens: its special tokens and
    every added token marked special (``<|im_start|>``, ``<start_of_turn>``, ...)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {token.content for token in added.values() if getattr(token, "special", False)}
    texts.update(getattr(tokenizer, "all_special_tokens", ()) or ())
    return frozenset(t for t in texts if t)


def neutralise(tokenizer: Any, text: str) -> str:
    """``text`` with every control token's text broken by a zero-width space, so a user
    who types ``<|im_start|>system`` or ``<start_of_turn>model`` produces ordinary text,
    never a real role marker (the content is rendered by a template, then tokenised)."""
    if not any(mark in text for mark in _CONTROL_MARKS):
        return text
    for token in sorted((t for t in control_tokens(tokenizer) if t in text), key=len,
                        reverse=True):
        text = text.replace(token, token[0] + _BREAK + token[1:])
    return text


def render(tokenizer: Any, messages: Sequence[ChatMessage], fmt: PromptFormat) -> list[int]:
    """Token ids of ``messages`` in ``fmt``, ready for the model to continue.

    Message content never becomes control tokens (see :func:`neutralise`): only the
    template's own markers are special.
    """
    messages = [ChatMessage(m.role, neutralise(tokenizer, m.content)) for m in messages]
    if fmt == "chat":
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        # The template already wrote any special tokens the model expects.
        ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(transcript(messages), add_special_tokens=True)["input_ids"]
    return list(ids)


def build_prompt(
    tokenizer: Any, messages: Sequence[ChatMessage], fmt: PromptFormat, budget: int
) -> Prompt:
    """Render ``messages`` in at most ``budget`` tokens, dropping the oldest turns first."""
    system_texts = [m.content for m in messages if m.role == "system"]
    system = [ChatMessage("system", "\n\n".join(system_texts))] if system_texts else []
    turns = [m for m in messages if m.role != "system"]
    newest = max((i for i, m in enumerate(turns) if m.role == "user"), default=0)
    history, tail = turns[:newest], turns[newest:]

    # Cut only at user turns so the kept history still alternates the way templates expect.
    starts = sorted({0, len(history)} | {i for i, m in enumerate(history) if m.role == "user"})

    def ids_from(start: int) -> list[int]:
        return render(tokenizer, [*system, *history[start:], *tail], fmt)

    shortest = ids_from(starts[-1])
    if len(shortest) > budget:
        return _truncate_newest(tokenizer, system, tail, fmt, budget, dropped=len(history))
    lo, hi, best = 0, len(starts) - 1, shortest
    while lo < hi:  # smallest start that fits; shorter histories fit whenever longer ones do
        mid = (lo + hi) // 2
        ids = ids_from(starts[mid])
        if len(ids) <= budget:
            hi, best = mid, ids
        else:
            lo = mid + 1
    return Prompt(best, dropped=starts[lo])


def _truncate_newest(
    tokenizer: Any,
    system: list[ChatMessage],
    tail: list[ChatMessage],
    fmt: PromptFormat,
    budget: int,
    dropped: int,
) -> Prompt:
    """Keep the end of the newest user message, as much of it as fits."""
    if not tail:
        return Prompt(render(tokenizer, system, fmt)[-budget:], dropped=dropped, truncated=True)
    newest, rest = tail[0], tail[1:]
    overhead = len(render(tokenizer, [*system, ChatMessage(newest.role, ""), *rest], fmt))
    content = tokenizer(newest.content, add_special_tokens=False)["input_ids"]
    room = budget - overhead
    ids: list[int] = []
    for _ in range(4):  # re-tokenizing decoded text can shift a boundary by a token or two
        if room <= 0:
            break
        text = tokenizer.decode(content[-room:], skip_special_tokens=True)
        ids = render(tokenizer, [*system, ChatMessage(newest.role, text), *rest], fmt)
        if len(ids) <= budget:
            return Prompt(ids, dropped=dropped, truncated=True)
        room -= len(ids) - budget
    # Not even the system message fits: keep the end, which holds the generation prompt.
    ids = ids or render(tokenizer, [*system, *tail], fmt)
    return Prompt(ids[-budget:], dropped=dropped, truncated=True)

"""Reading an NPC's line: the spoken text, and the tags checked against allow-lists.

The model's free text never triggers anything by itself: only a tag naming an emotion
of the configured set or an action of the NPC's allow-list counts; anything else is
dropped (and the tag removed from the line either way).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

_TAG = re.compile(r"\[\s*(emotion|action|relationship|fact)\s*:\s*([^\]\n]*)\]", re.IGNORECASE)
_SPACES = re.compile(r"[ \t]{2,}")


@dataclass(frozen=True, slots=True)
class Line:
    """What the game gets for one NPC line."""

    text: str
    emotion: str
    actions: tuple[str, ...] = ()
    relationship_change: int = 0
    facts: tuple[str, ...] = field(default_factory=tuple)


def parse(raw: str, *, emotions: Sequence[str], actions: Sequence[str],
          max_step: int) -> Line:
    """The line in ``raw`` with its tags read; unknown emotions and actions are dropped."""
    emotion = emotions[0] if emotions else "neutral"
    known_emotions = {e.lower(): e for e in emotions}
    allowed = {a.lower(): a for a in actions}
    chosen: list[str] = []
    change = 0
    facts: list[str] = []
    for match in _TAG.finditer(raw):
        kind, value = match.group(1).lower(), match.group(2).strip()
        if kind == "emotion" and value.lower() in known_emotions:
            emotion = known_emotions[value.lower()]
        elif kind == "action" and value.lower() in allowed:
            action = allowed[value.lower()]
            if action not in chosen:
                chosen.append(action)
        elif kind == "relationship":
            try:
                change += int(value.replace(" ", ""))
            except ValueError:
                pass  # "[relationship: better]" says nothing measurable
        elif kind == "fact" and value:
            facts.append(value[:200])
    change = max(-max_step, min(max_step, change))
    return Line(spoken(raw), emotion, tuple(chosen), change, tuple(facts))


def spoken(raw: str) -> str:
    """``raw`` without its tags."""
    return _SPACES.sub(" ", _TAG.sub("", raw)).strip()


def visible_prefix(raw: str) -> str:
    """What of a line still being written can be shown: up to a tag that may be starting."""
    cut = raw.find("[")
    return spoken(raw if cut < 0 else raw[:cut])

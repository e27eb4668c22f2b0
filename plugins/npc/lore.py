"""Which lorebook entries a moment of a conversation triggers, within a token budget.

An entry is in when it is constant, or one of its keys occurs in the scanned text (the
recent conversation and the game state) and, for a selective entry, one of its
secondary keys too. Keys are words or phrases (case as the entry says) or, with
``use_regex``, regular expressions (``/pattern/flags`` accepted). Triggered entries'
own text is scanned again for further entries, ``max_recursion`` times at most. Constant
entries go in first, then by priority (high first), each while the budget allows;
the text keeps the entries in insertion order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from plugins.npc.cards import LoreEntry

CHARS_PER_TOKEN = 4  # the plugin API's count


def tokens(text: str) -> int:
    """The tokens ``text`` is counted as (four characters a token, like plugin context)."""
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


@lru_cache(maxsize=1024)
def _pattern(key: str, use_regex: bool, case_sensitive: bool) -> re.Pattern[str] | None:
    flags = 0 if case_sensitive else re.IGNORECASE
    if use_regex:
        body = key
        if len(key) > 2 and key.startswith("/") and key.rfind("/") > 0:
            body, _, tail = key[1:].rpartition("/")
            flags |= re.IGNORECASE if "i" in tail else 0
        try:
            return re.compile(body, flags)
        except re.error:
            return None  # a broken pattern triggers nothing rather than failing the reply
    if not key.strip():
        return None
    # Whole words: the key "ale" is not in "tale".
    return re.compile(r"(?<!\w)" + re.escape(key.strip()) + r"(?!\w)", flags)


def _matches(keys: Sequence[str], entry: LoreEntry, text: str) -> bool:
    for key in keys:
        pattern = _pattern(key, entry.use_regex, entry.case_sensitive)
        if pattern is not None and pattern.search(text):
            return True
    return False


def triggered(entry: LoreEntry, text: str) -> bool:
    """Whether ``text`` triggers ``entry`` (constant entries are handled by :func:`select`)."""
    if not entry.enabled or not _matches(entry.keys, entry, text):
        return False
    return not entry.selective or not entry.secondary_keys or _matches(
        entry.secondary_keys, entry, text)


@dataclass(frozen=True, slots=True)
class Selection:
    """The entries chosen for a prompt, in insertion order, and the tokens they use."""

    entries: tuple[LoreEntry, ...]
    tokens: int

    @property
    def text(self) -> str:
        """The entries' contents, one paragraph each."""
        return "\n".join(entry.content.strip() for entry in self.entries)


def select(entries: Sequence[LoreEntry], scanned: str, *, budget: int,
           max_recursion: int = 2, recursive: bool = True) -> Selection:
    """The entries ``scanned`` triggers (plus constant ones), within ``budget`` tokens."""
    chosen: dict[int, LoreEntry] = {
        i: e for i, e in enumerate(entries) if e.enabled and e.constant}
    found = {i: e for i, e in enumerate(entries) if i not in chosen and triggered(e, scanned)}
    depth = 0
    new = dict(found)
    while recursive and new and depth < max_recursion:
        depth += 1
        text = "\n".join(e.content for e in new.values())
        new = {i: e for i, e in enumerate(entries)
               if i not in chosen and i not in found and triggered(e, text)}
        found.update(new)
    ranked = sorted(chosen.items()) + sorted(
        found.items(), key=lambda item: (-item[1].priority, item[1].insertion_order, item[0]))
    kept: list[tuple[int, LoreEntry]] = []
    used = 0
    for index, entry in ranked:
        cost = tokens(entry.content.strip()) + 1  # the newline between entries
        if used + cost > budget and not entry.constant:
            continue  # a smaller entry of lower priority may still fit
        kept.append((index, entry))
        used += cost
    kept.sort(key=lambda item: (item[1].insertion_order, item[0]))
    return Selection(tuple(entry for _, entry in kept), used)

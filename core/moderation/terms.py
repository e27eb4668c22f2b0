"""Blocklist and allowlist terms, matched on normalised words.

A term is a word (``idiot``), a phrase (``kill yourself``), a prefix (``fuck*``: any word
starting so) or an infix (``*fucker*``: any word containing it), and belongs to a
category (``insult``, ``threat``, ...; a bot's own terms to ``blocklist`` unless written
``threat:i will find you``). Every term is normalised as messages are, so ``5h1t`` and
``shiiit`` meet ``shit``. Allowlisted words are never matched, and allowlisted phrases --
the innocent phrases a listed word appears in -- are cut from the text first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.config import MODERATION_CATEGORIES
from core.errors import ConfigError
from core.moderation import builtin_terms
from core.moderation.normalise import Normalised, squeeze, words_of
from core.moderation.patterns import PatternFilter

# The category of terms from a bot's own lists, unless written ``category:term``.
CUSTOM = "blocklist"
_SEEN_WORDS = 20_000


@dataclass(frozen=True, slots=True)
class TermHit:
    """A blocked term found in a text: the term as listed, and its category."""

    term: str
    category: str


@dataclass(slots=True)
class _Compiled:
    words: dict[str, str] = field(default_factory=dict)  # word -> category
    prefixes: dict[int, dict[str, str]] = field(default_factory=dict)  # by length
    infixes: list[tuple[str, str]] = field(default_factory=list)
    phrases: list[tuple[str, str]] = field(default_factory=list)

    def add(self, term: str, category: str) -> None:
        self.seen.clear()
        star_start, star_end = term.startswith("*"), term.endswith("*")
        # Words are keyed as messages are: look-alikes folded, long runs squeezed.
        body = " ".join(words_of(term.strip("*")))
        if not body:
            return
        if " " in body:
            self.phrases.append((body, category))
        elif star_start and star_end:
            self.infixes.append((body, category))
        elif star_end:
            self.prefixes.setdefault(len(body), {})[body] = category
        else:
            self.words[body] = category
        # Messages have runs of three or more letters squeezed to one ("asssshole" ->
        # "ashole"), so a term's double letters are keyed squeezed too -- for longer
        # terms only: "coon" squeezed is the French "con".
        short = squeeze(body)
        if short != body and len(body) >= 5 and " " not in body:
            self.add("*" * star_start + short + "*" * star_end, category)

    # Each word's verdict, kept: chat repeats its words, and a word is looked up once
    # instead of against every prefix and infix each time (cleared when full).
    seen: dict[str, TermHit | None] = field(default_factory=dict)

    def find(self, words: Sequence[str], allowed: set[str]) -> TermHit | None:
        seen = self.seen
        for word in words:
            if word in allowed:
                continue
            if word in seen:
                hit = seen[word]
            else:
                if len(seen) >= _SEEN_WORDS:
                    seen.clear()
                hit = seen[word] = self._word(word)
            if hit is not None:
                return hit
        return None

    def _word(self, word: str) -> TermHit | None:
        category = self.words.get(word)
        if category is not None:
            return TermHit(word, category)
        for size, starts in self.prefixes.items():
            category = starts.get(word[:size])
            if category is not None:
                return TermHit(word[:size] + "*", category)
        for part, category in self.infixes:
            if part in word:
                return TermHit(f"*{part}*", category)
        return None


class TermFilter:
    """Finds blocklisted terms in a message; see the module docstring."""

    def __init__(
        self, blocked: Iterable[str | tuple[str, str]], allowed: Iterable[str] = (),
        patterns: PatternFilter | None = None,
    ) -> None:
        self._patterns = patterns
        self._blocked = _Compiled()
        for item in blocked:
            term, category = item if isinstance(item, tuple) else _categorised(item)
            self._blocked.add(term, category)
        self._phrase_words = max((p.count(" ") + 1 for p, _ in self._blocked.phrases),
                                 default=1)
        self._allowed_words: set[str] = set()
        self._allowed_phrases: list[str] = []
        for term in allowed:
            body = " ".join(words_of(term))
            if " " in body:
                self._allowed_phrases.append(body)
            elif body:
                self._allowed_words.add(body)
        # A phrase can be in a text only if its first word is: most texts have none of
        # the allowed phrases' first words, and only the blocked phrases starting with
        # one of its words are looked for (each word's in list order).
        self._allowed_firsts = frozenset(p.split(" ", 1)[0] for p in self._allowed_phrases)
        self._allowed_padded = tuple(f" {p} " for p in self._allowed_phrases)
        self._phrases = bool(self._allowed_phrases or self._blocked.phrases)
        self._blocked_by_first: dict[str, list[tuple[int, str, TermHit]]] = {}
        for i, (phrase, category) in enumerate(self._blocked.phrases):
            self._blocked_by_first.setdefault(phrase.split(" ", 1)[0], []).append(
                (i, f" {phrase} ", TermHit(phrase, category)))

    @classmethod
    def from_policy(
        cls,
        blocklist: Sequence[str],
        allowlist: Sequence[str],
        blocklist_files: Sequence[str] = (),
        allowlist_files: Sequence[str] = (),
        *,
        builtin: bool = True,
        base: Path | None = None,
    ) -> TermFilter:
        """A filter from a policy's lists and files (relative to ``base``)."""
        blocked: list[str | tuple[str, str]] = []
        if builtin:
            blocked += [(t, c) for c, terms in builtin_terms.TERMS.items() for t in terms]
        allowed = list(builtin_terms.ALLOWED) if builtin else []
        blocked += blocklist
        allowed += allowlist
        for name in blocklist_files:
            blocked += read_terms(name, base)
        for name in allowlist_files:
            allowed += read_terms(name, base)
        return cls(blocked, allowed, PatternFilter() if builtin else None)

    def prepare(self) -> None:
        """Build the built-in patterns' one-pass scanner now (off the event loop)."""
        if self._patterns is not None:
            self._patterns.prepare()

    @property
    def phrase_words(self) -> int:
        """The most words a blocked phrase has (1 if there are none)."""
        return self._phrase_words

    def find(self, text: Normalised) -> TermHit | None:
        """The first blocked term in ``text``, as written in the list; None if clean."""
        return self._find(text)[0]

    def _find(self, text: Normalised) -> tuple[TermHit | None, str | None]:
        """:meth:`find`, and the text's words between single spaces (one at each end)
        without its allowlisted phrases (None: the lists have no phrases, so the words
        as they are, ``text.key``; the output guard asks at every release)."""
        words = text.words
        if not self._phrases:
            return self._blocked.find(words, self._allowed_words), None
        key = f" {' '.join(words)} "
        # Split once (its ends are empty strings, which no phrase starts with).
        split = key.split(" ")
        if self._allowed_phrases and not self._allowed_firsts.isdisjoint(split):
            stripped = self._cut_allowed(key)
            if stripped != key:
                key, split = stripped, stripped.split(" ")
                words = tuple(stripped.split())
        hit = self._blocked.find(words, self._allowed_words)
        if hit is not None:
            return hit, key
        first: tuple[int, TermHit] | None = None
        by_first = self._blocked_by_first
        for word in by_first.keys() & split:
            for i, padded, phrase_hit in by_first[word]:
                if first is not None and i > first[0]:
                    break
                if padded in key:
                    first = (i, phrase_hit)
                    break
        return (first[1] if first is not None else None), key

    def find_in_message(self, text: Normalised,
                        scanned: tuple[str, Sequence[int]] | None = None) -> TermHit | None:
        """:meth:`find`, then the built-in patterns (input only; see ``patterns.py``).
        ``scanned``: a key already scanned for the patterns and their candidates in it
        (``patterns.SET``'s), used if the patterns are looked for in that key (the
        text's words with no allowlisted phrase cut from them, as a rule)."""
        hit, key = self._find(text)
        if hit is not None or self._patterns is None:
            return hit
        subject = text.key if key is None else key.strip()
        ids = scanned[1] if scanned is not None and scanned[0] == subject else None
        category = self._patterns.find(subject, ids)
        return TermHit(f"pattern:{category}", category) if category is not None else None

    def _without_allowed(self, key: str) -> str:
        """``key`` (words between single spaces, one at each end) without its allowlisted
        phrases."""
        if self._allowed_phrases and not self._allowed_firsts.isdisjoint(key.split(" ")):
            return self._cut_allowed(key)
        return key

    def _cut_allowed(self, key: str) -> str:
        for padded in self._allowed_padded:
            key = key.replace(padded, " ")
        return key

    def strip_allowed_message(self, text: Normalised) -> str:
        """:meth:`strip_allowed` of a normalised message: its clean text itself (no new
        key, no split) unless one of its words starts an allowlisted phrase."""
        if self._allowed_firsts.isdisjoint(text.words):
            return text.clean
        return self.strip_allowed(text.clean, text.key)

    def strip_allowed(self, text: str, key: str | None = None) -> str:
        """``text`` without its allowlisted phrases (for the classifier's eyes); ``key``
        is its normalised words, if known."""
        if not self._allowed_phrases:
            return text
        key = f" {key if key is not None else ' '.join(words_of(text))} "
        stripped = self._without_allowed(key)
        # Unchanged, the text itself goes on: its case and links are signals too.
        return text if stripped == key else stripped.strip()


def _categorised(term: str) -> tuple[str, str]:
    """``category:term`` -> (term, category); a plain term is in :data:`CUSTOM`."""
    head, sep, rest = term.partition(":")
    if sep and head.strip() in MODERATION_CATEGORIES and rest.strip():
        return rest.strip(), head.strip()
    return term, CUSTOM


def read_terms(name: str, base: Path | None) -> list[str]:
    """The terms of a file: one a line, blank lines and ``#`` comments skipped."""
    path = Path(name)
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"moderation: cannot read terms file {path}: {exc}") from None
    return [s for line in lines if (s := line.split("#", 1)[0].strip())]

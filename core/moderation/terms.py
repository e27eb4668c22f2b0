"""Blocklist and allowlist terms, matched on normalised words.

A term is a word (``idiot``), a phrase (``kill yourself``), a prefix (``fuck*``: any word
starting so) or an infix (``*fucker*``: any word containing it). Every term is
normalised as messages are, so ``5h1t`` and ``shiiit`` meet ``shit``. Allowlisted words
are never matched, and allowlisted phrases are cut from the text first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigError
from core.moderation import builtin_terms
from core.moderation.normalise import Normalised, squeeze, words_of

# Elongation ("fuuuck") is three or more of a letter; two is often just spelling
# ("coon" must not become "con").
_ELONGATED = re.compile(r"(.)\1\1")


@dataclass(slots=True)
class _Compiled:
    words: set[str] = field(default_factory=set)
    squeezed: set[str] = field(default_factory=set)
    prefixes: dict[int, set[str]] = field(default_factory=dict)
    squeezed_prefixes: dict[int, set[str]] = field(default_factory=dict)
    infixes: list[str] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)

    def add(self, term: str) -> None:
        star_start, star_end = term.startswith("*"), term.endswith("*")
        body = " ".join(words_of(term.strip("*")))
        if not body:
            return
        if " " in body:
            self.phrases.append(body)
        elif star_start and star_end:
            self.infixes.append(body)
        elif star_end:
            self.prefixes.setdefault(len(body), set()).add(body)
            short = squeeze(body)
            self.squeezed_prefixes.setdefault(len(short), set()).add(short)
        else:
            self.words.add(body)
            self.squeezed.add(squeeze(body))

    def find(self, words: Sequence[str], allowed: set[str]) -> str | None:
        for word in words:
            if word in allowed:
                continue
            hit = self._match(word, self.words, self.prefixes)
            if hit is None and _ELONGATED.search(word):
                hit = self._match(squeeze(word), self.squeezed, self.squeezed_prefixes)
            if hit is not None:
                return hit
        return None

    def _match(self, word: str, exact: set[str], prefixes: dict[int, set[str]]) -> str | None:
        if word in exact:
            return word
        for size, starts in prefixes.items():
            if word[:size] in starts:
                return word[:size] + "*"
        for part in self.infixes:
            if part in word:
                return f"*{part}*"
        return None


class TermFilter:
    """Finds blocklisted terms in a message; see the module docstring."""

    def __init__(self, blocked: Iterable[str], allowed: Iterable[str] = ()) -> None:
        self._blocked = _Compiled()
        for term in blocked:
            self._blocked.add(term)
        self._allowed_words: set[str] = set()
        self._allowed_phrases: list[str] = []
        for term in allowed:
            body = " ".join(words_of(term))
            if " " in body:
                self._allowed_phrases.append(body)
            elif body:
                self._allowed_words.add(body)

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
        blocked = list(builtin_terms.TERMS) if builtin else []
        allowed = list(builtin_terms.ALLOWED) if builtin else []
        blocked += blocklist
        allowed += allowlist
        for name in blocklist_files:
            blocked += read_terms(name, base)
        for name in allowlist_files:
            allowed += read_terms(name, base)
        return cls(blocked, allowed)

    def find(self, text: Normalised) -> str | None:
        """The first blocked term in ``text``, as written in the list; None if clean."""
        words = text.words
        key = ""
        if self._allowed_phrases or self._blocked.phrases:
            key = f" {' '.join(words)} "
            for phrase in self._allowed_phrases:
                key = key.replace(f" {phrase} ", " ")
            words = tuple(key.split())
        hit = self._blocked.find(words, self._allowed_words)
        if hit is not None:
            return hit
        if self._blocked.phrases:
            squeezed = f" {' '.join(squeeze(w) if _ELONGATED.search(w) else w for w in words)} "
            for phrase in self._blocked.phrases:
                if f" {phrase} " in key or f" {phrase} " in squeezed:
                    return phrase
        return None

    def strip_allowed(self, text: str) -> str:
        """``text`` without its allowlisted phrases (for the classifier's eyes)."""
        if not self._allowed_phrases:
            return text
        key = f" {' '.join(words_of(text))} "
        for phrase in self._allowed_phrases:
            key = key.replace(f" {phrase} ", " ")
        return key.strip()


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

"""Text normalisation: what filters match against, so that disguises don't slip past.

Two forms are made of a message. ``clean`` is what the pipeline continues with: NFKC,
with zero-width and other invisible characters removed. ``words`` are the matching
keys: casefolded, accents dropped, look-alike letters from other scripts folded to the
Latin letter they imitate (Cyrillic o, U+043E, -> ``o``, by the Unicode TR39 confusables
table), leetspeak folded (``5h1t`` -> ``shit``), runs of three or more of one letter
squeezed (``l0000ser`` -> ``loser``), and letters spelled out one by one joined again
(``f u c k``, ``m_o_r_o_n``, ``k.i.l.l`` -> one word; a wider gap starts the next word,
so ``y o u  a r e`` is two words).
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType

# Format characters (Cf) are invisible: zero-width spaces and joiners, bidi controls,
# the tag block used to smuggle ASCII past readers. Variation selectors too.
_INVISIBLE_EXTRA = {0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0, *range(0xFE00, 0xFE10)}
# Invisible but innocent: they build emoji (family, skin tones, red heart) and hyphenate.
_EMOJI_GLUE = {0x200D, 0xFE0E, 0xFE0F, 0x00AD}

_LEET = str.maketrans({
    "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
    "@": "a", "$": "s", "!": "i", "|": "i", "€": "e", "+": "t",
})
# A word, possibly disguised: letters, digits and the leet symbols inside it. The
# underscore is a separator ("m_o_r_o_n"), not part of a word.
_TOKEN = re.compile(r"(?:[^\W_]|[@$!|€+])+")
_LONG_RUNS = re.compile(r"(.)\1\1+")
_RUNS = re.compile(r"(.)\1+")
_CHUNKS_KEPT = 20_000  # runs of non-spaces whose keys are kept (see words_of)
_KEPT_CHARS = 32  # ... if no longer than this


@functools.cache
def confusables() -> Mapping[str, str]:
    """Non-ASCII characters that look like an ASCII letter or digit -> that character.

    Read once from the Unicode TR39 ``confusables.txt`` data that the
    ``confusable-homoglyphs`` package maintains, so the table follows Unicode rather
    than a hand list. CJK characters are left alone (U+3007 is a numeral, not an O).
    """
    raw = resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text(
        encoding="utf-8")
    table: dict[str, str] = {}
    for key, entries in json.loads(raw).items():
        for entry in entries:
            other = entry["c"]
            if len(key) != 1 or len(other) != 1:
                continue
            if key.isascii() and key.isalnum() and not other.isascii():
                source, target = other, key.lower()
            elif other.isascii() and other.isalnum() and not key.isascii():
                source, target = key, other.lower()
            else:
                continue
            if 0x2E80 <= ord(source) < 0xA000 or 0xAC00 <= ord(source) < 0xD7B0:
                continue
            # A letter beats a digit: Cyrillic capital O (U+041E) is read as "o", not "0".
            if source not in table or (table[source].isdigit() and target.isalpha()):
                table[source] = target
    return MappingProxyType(table)


def is_invisible(char: str) -> bool:
    """Whether ``char`` shows nothing (and so can hide text from a reader)."""
    return unicodedata.category(char) == "Cf" or ord(char) in _INVISIBLE_EXTRA


def strip_invisible(text: str) -> tuple[str, int]:
    """``text`` without invisible characters, and how many of them could hide text.

    Emoji glue (zero-width joiner, variation selectors) and soft hyphens are removed
    too but not counted: they are what ordinary emoji are made of.
    """
    if text.isascii():
        return text, 0
    kept: list[str] = []
    hiding = 0
    for c in text:
        if is_invisible(c):
            hiding += ord(c) not in _EMOJI_GLUE
        else:
            kept.append(c)
    return "".join(kept), hiding


def fold(text: str) -> str:
    """Casefolded, accents removed, look-alikes folded: the base of every matching key."""
    folded = text.casefold()
    if folded.isascii():
        return folded
    table = confusables()
    # Look-alikes first: NFKD would split some of them ("й" is not "и" plus a mark).
    folded = "".join(table.get(c, c) for c in folded)
    decomposed = unicodedata.normalize("NFKD", folded)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def squeeze(word: str) -> str:
    """``word`` with each run of one character collapsed to a single one."""
    return _RUNS.sub(r"\1", word)


@dataclass(frozen=True, slots=True)
class Normalised:
    """A message's clean text and its matching keys; see the module docstring."""

    clean: str
    invisible: int  # characters that could hide text (not emoji glue)
    words: tuple[str, ...]

    @property
    def key(self) -> str:
        """The words joined by single spaces (for phrase matching)."""
        return " ".join(self.words)


def normalise(text: str) -> Normalised:
    """See the module docstring."""
    if text.isascii():
        return Normalised(text, 0, tuple(words_of(text)))
    nfkc = unicodedata.normalize("NFKC", text)
    bare, invisible = strip_invisible(nfkc)
    # The text that goes on keeps its emoji whole; matching sees no invisible characters.
    clean = "".join(c for c in nfkc if ord(c) in _EMOJI_GLUE or not is_invisible(c))
    return Normalised(clean, invisible, tuple(words_of(bare)))


def words_of(text: str) -> list[str]:
    """The matching keys of ``text``'s words, in order."""
    # Chat repeats its words: each run of non-spaces is keyed once and kept. The keys of
    # a text are those of its runs, one after another -- unless letters spelled out one
    # by one go on across a space ("f u c k"): then the text is keyed as a whole.
    words: list[str] = []
    single_before = False  # the last word so far is a single letter
    kept = _kept
    for chunk in text.split():
        found = kept.get(chunk)
        if found is None:
            found = _chunk_keys(chunk)
            if len(chunk) <= _KEPT_CHARS:
                if len(kept) >= _CHUNKS_KEPT:
                    kept.clear()
                kept[chunk] = found
        keys, single_first, single_last = found
        if keys:
            if single_before and single_first:
                return _keys(text)[0]
            words += keys
            single_before = single_last
    return words


_ChunkKeys = tuple[tuple[str, ...], bool, bool]  # a run's keys; first, last a single letter


def _chunk_keys(chunk: str) -> _ChunkKeys:
    words, first, last = _keys(chunk)
    return tuple(words), first, last


# Kept for runs of up to _KEPT_CHARS characters (a word, not a pasted blob), in a plain
# dict cleared when full: every word of every text is looked up here, and a dict lookup
# costs less than functools.lru_cache's (which reorders its list at every hit).
_kept: dict[str, _ChunkKeys] = {}


def _keys(text: str) -> tuple[list[str], bool, bool]:
    """The matching keys of ``text``'s words, and whether its first and its last word
    are a single letter (which may join letters next to it, in a longer text)."""
    folded = fold(text)
    # Runs of one letter are rare: looked for once, in the whole text with leetspeak
    # folded (a superset of where a word can have one), instead of in every word.
    runs = _LONG_RUNS.search(folded.translate(_LEET)) is not None
    words: list[str] = []
    singles: list[str] = []  # letters of a word spelled out one by one
    gap: str | None = None  # the one character between them ("f.u.c.k": ".")
    end = 0
    first: bool | None = None
    single = False
    for match in _TOKEN.finditer(folded):
        between = folded[end:match.start()]
        end = match.end()
        raw = match.group().strip("!|+")
        word = raw.translate(_LEET) if not raw.isdigit() else raw
        if not word:
            continue
        if runs:
            word = _LONG_RUNS.sub(r"\1", word)
        single = len(word) == 1 and word.isalpha()
        if first is None:
            first = single
        if single:
            if len(singles) == 1 and len(between) == 1 and gap is None:
                gap = between
                singles.append(word)
                continue
            if singles and between == gap:
                singles.append(word)
                continue
            words += _joined(singles)
            singles, gap = [word], None
            continue
        if singles:
            words += _joined(singles)
            singles, gap = [], None
        words.append(word)
    words += _joined(singles)
    return words, bool(first), single


def _joined(singles: list[str]) -> list[str]:
    # "f u c k" was one word spelled out; "a b" is more likely two words.
    return ["".join(singles)] if len(singles) >= 3 else list(singles)

"""Text normalisation: what filters match against, so that disguises don't slip past.

Two forms are made of a message. ``clean`` is what the pipeline continues with: NFKC,
with zero-width and other invisible characters removed. ``words`` are the matching
keys: casefolded, accents dropped, leetspeak folded (``5h1t`` -> ``shit``), and letters
spelled out one by one joined again (``f u c k`` -> ``fuck``). ``squeezed`` repeats
each word with runs of a letter collapsed (``fuuuck`` -> ``fuck``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Format characters (Cf) are invisible: zero-width spaces and joiners, bidi controls,
# the tag block used to smuggle ASCII past readers. Variation selectors too.
_INVISIBLE_EXTRA = {0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0, *range(0xFE00, 0xFE10)}
# Invisible but innocent: they build emoji (family, skin tones, red heart) and hyphenate.
_EMOJI_GLUE = {0x200D, 0xFE0E, 0xFE0F, 0x00AD}

_LEET = str.maketrans({
    "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
    "@": "a", "$": "s", "!": "i", "|": "i", "€": "e", "+": "t",
})
# A word, possibly disguised: letters, digits and the leet symbols inside it.
_TOKEN = re.compile(r"[\w@$!|€+]+")
_RUNS = re.compile(r"(.)\1+")


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
    """Casefolded, accents removed: the base every matching key starts from."""
    folded = text.casefold()
    if folded.isascii():
        return folded
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
    words: list[str] = []
    singles: list[str] = []
    for raw in _TOKEN.findall(fold(text)):
        raw = raw.strip("!|+_")
        word = raw.translate(_LEET) if not raw.isdigit() else raw
        if not word:
            continue
        if len(word) == 1 and word.isalpha():
            singles.append(word)
            continue
        if singles:
            words += _joined(singles)
            singles = []
        words.append(word)
    if singles:
        words += _joined(singles)
    return words


def _joined(singles: list[str]) -> list[str]:
    # "f u c k" was one word spelled out; "a b" is more likely two words.
    return ["".join(singles)] if len(singles) >= 3 else singles

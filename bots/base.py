"""What every channel adapter shares: the Adapter protocol and helpers for platform limits."""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import regex
from pydantic import BaseModel

from core.app import Adapter, AdapterFactory
from core.config import BotSettings, validate_section

__all__ = ["Adapter", "AdapterFactory", "adapter_settings", "split_message", "utf16_length"]

M = TypeVar("M", bound=BaseModel)


def adapter_settings(model: type[M], settings: BotSettings, section: Mapping[str, Any],
                     name: str) -> M:
    """The adapter's ``[adapters.NAME]`` table validated against ``model``; a wrong
    key fails as ``FILE: adapters.NAME.key: reason``."""
    return validate_section(model, section, source=settings.source, prefix=f"adapters.{name}")

# Preferred cut points, best first: between paragraphs, between lines, between words.
_SEPARATORS = ("\n\n", "\n", " ")
_GRAPHEME = regex.compile(r"\X", regex.DOTALL)
# A Markdown code fence line: ``` or ~~~ (3 or more), an optional info string.
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})([^\n`]*)$", re.MULTILINE)
# Inline Markdown a cut must not fall into: code, bold, italic, strike, spoiler, links.
_INLINE = re.compile(
    r"`[^`\n]+`|\*\*[^\n]+?\*\*|__[^\n]+?__|~~[^\n]+?~~|\|\|[^\n]+?\|\||"
    r"\[[^\]\n]*\]\([^)\s]*\)|(?<![\w*])\*[^*\n]+\*(?![\w*])|(?<![\w_])_[^_\n]+_(?![\w_])"
)


def utf16_length(text: str) -> int:
    """How many UTF-16 code units ``text`` takes (how Telegram counts a message's length)."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


@dataclass(frozen=True, slots=True)
class _Fence:
    """A fenced code block: its opener line, the start of its closer line, its marker."""

    start: int  # where the opener line begins
    body: int  # where the first line of code begins
    close: int  # where the closer line begins (len(text) if unclosed)
    end: int  # just past the closer line
    marker: str
    info: str


def split_message(
    text: str,
    limit: int,
    *,
    length: Callable[[str], int] = len,
    markdown: bool = False,
) -> list[str]:
    """``text`` cut into parts of at most ``limit`` units, for platforms that cap a message.

    Cuts between paragraphs if it can, else between lines, else between words, else (a word
    longer than ``limit``) inside the word, but never inside a grapheme cluster (an emoji
    with its modifiers, a letter with its accents). Only whitespace at a cut is dropped, so
    the parts, in order, hold every other character of ``text``; whitespace-only parts are
    left out, and text with nothing but whitespace gives no parts.

    ``length`` measures a string: ``len`` counts code points (Discord), ``utf16_length``
    UTF-16 units (Telegram); it must be additive over concatenation. With ``markdown``, a
    cut never falls inside inline formatting (code, bold, a link, ...) that fits in a part,
    and a fenced code block cut in two is closed at the end of one part and opened again,
    with its language, at the start of the next. Splitting is prefix-stable: the first
    parts of a text depend only on its first ``limit``-odd units, so a growing text keeps
    the parts it already had.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1 (got {limit})")
    return _Splitter(text, limit, length, markdown).parts()


class _Splitter:
    """One run of :func:`split_message`: positions are indices into ``text``."""

    def __init__(
        self, text: str, limit: int, length: Callable[[str], int], markdown: bool
    ) -> None:
        self.text = text
        self.limit = limit
        self.length = length
        # units[i]: the length of text[:i]; boundaries: where grapheme clusters begin.
        self.units = [0]
        for ch in text:
            self.units.append(self.units[-1] + length(ch))
        self.boundaries = [m.start() for m in _GRAPHEME.finditer(text)] + [len(text)]
        self.fences = _fences(text) if markdown else []
        self.spans = _inline_spans(text, self.fences) if markdown else []

    def parts(self) -> list[str]:
        text, parts = self.text, []
        pos, reopen = 0, ""
        while pos < len(text):
            budget = self.limit - self.length(reopen)
            if self.units[len(text)] - self.units[pos] <= budget:
                part = reopen + text[pos:]
                if part.strip():
                    parts.append(part)
                break
            # Room for a closing fence, in case the cut lands inside a code block.
            reserve = 4 if self.fences else 0
            cut, resume = self._cut(pos, max(1, budget - reserve))
            fence = self._fence_at(cut)
            part = text[pos:cut].rstrip()
            next_reopen = ""
            if fence is not None:
                part += "\n" + fence.marker
                if resume >= fence.close:
                    resume = fence.end  # the closer just written stands for the original
                else:
                    next_reopen = fence.marker + fence.info + "\n"
            if text[pos:cut].strip():
                parts.append(reopen + part)
            pos, reopen = resume, next_reopen
        return parts

    def _cut(self, pos: int, budget: int) -> tuple[int, int]:
        """Where the part starting at ``pos`` ends, and where the next one starts."""
        text = self.text
        # The furthest end that fits: a separator starting right there still fits.
        end = bisect.bisect_right(self.units, self.units[pos] + budget) - 1
        window = text[pos : end + 1]
        for separator in _SEPARATORS:
            at = len(window)
            while True:
                at = window.rfind(separator, 0, at)
                if at <= 0:
                    break
                cut = pos + at
                if self._allowed(cut, budget):
                    resume = cut + len(separator)
                    # Spaces after a line break may be indentation; after a word, just space.
                    strip = " " if separator == " " else "\n"
                    while resume < len(text) and text[resume] in strip:
                        resume += 1
                    return cut, resume
        # No separator: the last grapheme boundary that fits, outside inline formatting
        # if it can be; a cluster longer than the whole budget is cut between code points.
        index = bisect.bisect_right(self.boundaries, end) - 1
        candidates = [b for b in self.boundaries[: index + 1] if b > pos]
        for cut in reversed(candidates):
            if self._allowed(cut, budget):
                return cut, cut
        if candidates:
            return candidates[-1], candidates[-1]
        return max(end, pos + 1), max(end, pos + 1)

    def _allowed(self, cut: int, budget: int) -> bool:
        """Whether a cut at ``cut`` keeps clusters, inline formatting that fits in
        ``budget`` and fence lines whole."""
        i = bisect.bisect_left(self.boundaries, cut)
        if i == len(self.boundaries) or self.boundaries[i] != cut:
            return False
        for start, end in self.spans:
            if start < cut < end and self.units[end] - self.units[start] <= budget:
                return False
        for fence in self.fences:
            # Not inside an opener or closer line.
            if fence.start < cut < fence.body or fence.close < cut < fence.end:
                return False
        return True

    def _fence_at(self, cut: int) -> _Fence | None:
        for fence in self.fences:
            if fence.body <= cut <= fence.close and cut < len(self.text):
                return fence
        return None


def _fences(text: str) -> list[_Fence]:
    fences: list[_Fence] = []
    opener: re.Match[str] | None = None
    for match in _FENCE.finditer(text):
        marker = match.group(1)
        if opener is None:
            opener = match
        elif marker[0] == opener.group(1)[0] and len(marker) >= len(opener.group(1)) and (
            not match.group(2).strip()
        ):
            fences.append(_make_fence(text, opener, match.start(), match.end()))
            opener = None
    if opener is not None:
        fences.append(_make_fence(text, opener, len(text), len(text)))
    return fences


def _make_fence(text: str, opener: re.Match[str], close: int, end: int) -> _Fence:
    body = min(opener.end() + 1, len(text))
    return _Fence(opener.start(), body, max(close, body), end, opener.group(1),
                  opener.group(2).strip())


def _inline_spans(text: str, fences: list[_Fence]) -> list[tuple[int, int]]:
    spans = []
    for match in _INLINE.finditer(text):
        if not any(f.start <= match.start() < f.end for f in fences):
            spans.append(match.span())
    return spans

"""System-prompt leakage (OWASP LLM07): a reply that recites the bot's instructions.

The system text of a request (persona, plugin instructions, what is known about the
user) is split into words, casefolded, punctuation dropped. A reply leaks when it holds
a run of those words, in order, at least ``min_chars`` characters long -- verbatim or
nearly (case, punctuation, line breaks and markdown don't hide it) -- or the bot's
canary. The guard also asks where the trailing run of such words starts, so it holds
them back until the run breaks: the overlapping part is never shown mid-stream.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_WORD = re.compile(r"\w+")


class LeakDetector:
    """Finds runs of a system text's words in a reply; see the module docstring."""

    def __init__(self, system: str, min_chars: int, canary: str | None = None) -> None:
        self._sequences: list[tuple[list[str], int]] = []  # (words, chars that count)
        self._positions: list[dict[str, list[int]]] = []  # word -> where it is, per sequence
        words = [w.casefold() for w in _WORD.findall(system)]
        if words:
            self._sequences.append((words, min_chars))
        if canary:
            canary_words = [w.casefold() for w in _WORD.findall(canary)]
            if canary_words:
                # All of the canary, however short.
                self._sequences.append((canary_words, _chars(canary_words)))
        self.margin = 2 * max([min_chars, *(n for _, n in self._sequences)])
        self._least = min((n for _, n in self._sequences), default=0)  # the shortest leak
        self._prefixes: set[str] = set()  # of every system word: a word still arriving
        # Per sequence, each word's characters in it (one more for the space after it, each
        # time it is there): a run of a text's words in order is no longer than the sum of
        # those of its distinct words, less one.
        self._weights: list[dict[str, int]] = []
        for sequence, _ in self._sequences:
            positions: dict[str, list[int]] = {}
            weights: dict[str, int] = {}
            for j, word in enumerate(sequence):
                positions.setdefault(word, []).append(j)
                weights[word] = weights.get(word, 0) + len(word) + 1
                self._prefixes.update(word[:i] for i in range(1, len(word) + 1))
            self._positions.append(positions)
            self._weights.append(weights)

    def __bool__(self) -> bool:
        return bool(self._sequences)

    def find(self, text: str) -> str | None:
        """``"system"`` or ``"canary"`` if ``text`` leaks, else None."""
        if text.isascii():  # casefolded as a whole: the same words
            if len(text) < self._least:
                # A run of its words (with one character between each two) is no longer
                # than the text. (Casefolding may lengthen other text: "ß" -> "ss".)
                return None
            words = _WORD.findall(text.lower())
        else:
            words = [w.casefold() for w in _WORD.findall(text)]
        for index, (_, limit) in enumerate(self._sequences):
            # Most texts have too few system words for a run as long as the limit (no run
            # is longer than its distinct words' weights, less one): no runs looked for.
            weights = self._weights[index]
            if sum(map(weights.__getitem__, weights.keys() & words)) > limit \
                    and _runs(words, self._positions[index])[0] >= limit:
                return "canary" if index else "system"
        return None

    def trailing_run_start(self, shown: str, pending: str) -> int | None:
        """Where in ``pending`` the run of system words that ends it starts, if any.

        A word still arriving (no space after it yet) counts as part of the run if a
        system word that would continue the run starts with it.
        """
        before = shown[-self.margin:]
        text = before + pending
        # Most texts end in a word that neither is a system word nor starts one (if it is
        # still arriving): no run ends them, seen from that word alone (the first in the
        # text reversed), without the others.
        last = _WORD.search(text[::-1])
        if last is None:
            return None
        word = last.group()[::-1].casefold()
        if word not in self._prefixes if text[-1:].isalnum() \
                else not any(word in p for p in self._positions):
            return None
        return self._run_start(text, len(before))

    def _run_start(self, text: str, skip: int) -> int | None:
        """:meth:`trailing_run_start` in ``text[skip:]``, from all of ``text``'s words."""
        matches = list(_WORD.finditer(text))
        partial = matches[-1].group().casefold() if matches and text[-1:].isalnum() else None
        words = [m.group().casefold() for m in (matches[:-1] if partial else matches)]
        start: int | None = None
        for (sequence, _), positions in zip(self._sequences, self._positions, strict=True):
            _, ends = _runs(words, positions)
            if partial is not None:
                ends = {j + 1: n + 1 for j, n in ends.items()
                        if j + 1 < len(sequence) and sequence[j + 1].startswith(partial)}
                ends.update({j: 1 for j, w in enumerate(sequence)
                             if j not in ends and w.startswith(partial)})
            trailing = max(ends.values(), default=0)
            if trailing:
                offset = max(0, matches[len(matches) - trailing].start() - skip)
                start = offset if start is None else min(start, offset)
        return start


def _chars(words: Sequence[str]) -> int:
    return sum(len(w) for w in words) + max(0, len(words) - 1)


def _runs(
    words: Sequence[str], positions: Mapping[str, Sequence[int]]
) -> tuple[int, dict[int, int]]:
    """The longest run (in characters) of ``words`` found in order in a sequence (given
    as where each of its words is), and the runs the last word ends: position in the
    sequence -> words in the run."""
    previous: dict[int, tuple[int, int]] = {}  # end position in sequence -> (words, chars)
    longest = 0
    for word in words:
        places = positions.get(word)
        if places is None:  # most words of a reply: no run goes on through them
            previous = {}
            continue
        current: dict[int, tuple[int, int]] = {}
        size = len(word) + 1
        for j in places:
            count, chars = previous.get(j - 1, (0, -1))
            chars += size
            current[j] = (count + 1, chars)
            if chars > longest:
                longest = chars
        previous = current
    return longest, {j: count for j, (count, _) in previous.items()}

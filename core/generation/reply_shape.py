"""Chat-shaped reply endings that every backend applies the same way: where a reply may
stop near its token limit (:func:`reply_limits`) and at which sentence end (:class:`SentenceEnds`).
"""

from __future__ import annotations

import re

from core.generation.base import SamplingParams

# A sentence ends at . ! ? or … (then any closing quotes, brackets or emphasis) followed
# by whitespace: "3.5", "e.g.x" and "…" inside a word do not end one.
_SENTENCE_END = re.compile("[.!?\u2026][\"'\u201d\u2019)\\]*_]*(?=\\s)")
_TAIL_CHARS = 16  # enough to see an end split across pushes


def reply_limits(sampling: SamplingParams) -> tuple[int, int | None]:
    """The most tokens a reply may take, and from which token on it ends at its next
    sentence end (None: it just stops at ``max_new_tokens``).

    With ``finish_sentence``, a reply starts wrapping up at three quarters of
    ``max_new_tokens`` and may run a quarter over to finish its sentence: ending
    mid-word is what makes a chat reply look broken.
    """
    if not sampling.finish_sentence or sampling.ignore_eos:
        return sampling.max_new_tokens, None
    wrap_up_at = max(1, -(-3 * sampling.max_new_tokens // 4))
    return sampling.max_new_tokens + sampling.max_new_tokens // 4, wrap_up_at


class SentenceEnds:
    """Ends a reply at a sentence end: after ``max_sentences`` of them, or at the first
    one once told to wrap up (the reply is close to its token limit).

    Text up to the sentence end that ends the reply is shown; what follows is dropped.
    """

    def __init__(self, max_sentences: int | None = None) -> None:
        self.max_sentences = max_sentences
        self.count = 0
        self.stopped = False
        self._tail = ""

    def push(self, text: str, *, wrapping_up: bool = False) -> str:
        """The part of ``text`` to show; sets ``stopped`` when the reply ends in it."""
        if self.stopped:
            return ""
        seen = self._tail + text
        for end in _SENTENCE_END.finditer(seen):
            # Only an end whose whitespace arrived now is new (the rest were counted).
            if end.end() < len(self._tail):
                continue
            self.count += 1
            limit = self.max_sentences is not None and self.count >= self.max_sentences
            if wrapping_up or limit:
                self.stopped = True
                return text[: max(end.end() - len(self._tail), 0)]
        self._tail = seen[-_TAIL_CHARS:]
        return text

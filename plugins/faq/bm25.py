"""Okapi BM25 over the entries' questions: retrieval where no embedding model is wanted.

Small on purpose (a knowledge base has tens to thousands of questions); scores are
normalised to about 0..1 so that the same thresholds logic applies as for embeddings.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9]+")
# Words that carry no topic in a support question; matching on them alone is noise.
STOPWORDS = frozenset(
    "a an the and or but if of to in on at for from by with about as into is are was were "
    "be been being am do does did doing have has had i me my mine you your yours we our us "
    "it its this that these those there here what which who whom how when where why can "
    "could would should will shall may might must not no yes please hi hello thanks so "
    "just any some anything something get got still also too very much many".split()
)


def tokenize(text: str) -> list[str]:
    """Lower-cased words without stop words, with a crude plural fold (``valves`` -> ``valve``)."""
    words = []
    for word in _WORD.findall(text.lower()):
        if word in STOPWORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        words.append(word)
    return words


class BM25Index:
    """BM25 scores of a query against each document; ``k1`` and ``b`` as in Okapi BM25."""

    def __init__(self, documents: Sequence[str], *, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._docs = [Counter(tokenize(d)) for d in documents]
        self._lengths = [sum(d.values()) for d in self._docs]
        self._avg = (sum(self._lengths) / len(self._lengths)) if self._docs else 1.0
        df: Counter[str] = Counter()
        for doc in self._docs:
            df.update(doc.keys())
        n = len(self._docs)
        self._idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self._max_idf = math.log(1 + (n + 0.5) / 0.5)

    def scores(self, query: str) -> list[float]:
        """Each document's score, divided by the most a document matching every query word
        once could get, so a full match of an average-length document scores about 1."""
        words = set(tokenize(query))
        terms = [t for t in words if t in self._idf]
        if not terms:
            return [0.0] * len(self._docs)
        # A query word no document has counts as the rarest word in the ceiling: a
        # question about something the FAQ never mentions must not look like a match.
        ceiling = sum(self._idf.get(t, self._max_idf) for t in words)
        out = []
        for doc, length in zip(self._docs, self._lengths, strict=True):
            norm = self.k1 * (1 - self.b + self.b * length / (self._avg or 1.0))
            total = 0.0
            for t in terms:
                tf = doc.get(t, 0)
                if tf:
                    total += self._idf[t] * tf * (self.k1 + 1) / (tf + norm)
            out.append(total / ceiling)
        return out

"""The offline classifier: a linear model over character and word n-grams, per category.

It reads the matching keys of :mod:`~core.moderation.normalise` (look-alikes, leetspeak,
spacing and stretched letters already undone), so ``y0u 4r3 stuuupid`` looks like
``you are stupid``; character n-grams carry it across languages (Chinese included) and
across spellings the training set never had. A few signals of the raw text (a link,
shouting, a word or character repeated many times) are features too, for spam.

The weights are trained by ``bench/train_moderation.py`` on the development part of
``bench/data/moderation`` (never on the held-out part) and shipped beside this module
as ``ngram_model.json.gz``: a few hundred kilobytes, read at start, evaluated in plain
Python in tens of microseconds. Scores are logistic probabilities per category; the
file also carries the thresholds chosen on the development set.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from itertools import pairwise
from typing import Any

from core.lifecycle import ServiceBase
from core.moderation.normalise import Normalised, normalise

MODEL_FILE = "ngram_model.json.gz"
_URL = re.compile(r"https?://|www\.|\b[\w-]+\.(?:com|net|org|xyz|top|biz|ru|cn|click|gg|io|"
                  r"fr|de|es|co|me|ly|info|site|online)\b", re.IGNORECASE)
_CHAR_RUN = re.compile(r"(.)\1{7,}")


def _cjk(char: str) -> bool:
    return "\u2e80" <= char < "\ua000" or "\uac00" <= char < "\ud7b0"


def signals(clean: str) -> list[str]:
    """Features of the raw text that normalisation takes away (for spam)."""
    found: list[str] = []
    if _URL.search(clean):
        found.append("#url")
    letters = [c for c in clean if c.isalpha()]
    if len(letters) >= 8 and sum(c.isupper() for c in letters) >= 0.7 * len(letters):
        found.append("#caps")
    if _CHAR_RUN.search(clean):
        found.append("#run")
    words = clean.lower().split()
    if len(words) >= 4 and len(set(words)) <= len(words) / 3:
        found.append("#repeat")
    if clean.count("!") >= 3:
        found.append("#bang")
    return found


def features(text: str | Normalised) -> set[str]:
    """The features of ``text``: character 2- to 4-grams of its matching keys (with word
    boundaries), CJK characters, words, word pairs and :func:`signals`."""
    norm = text if isinstance(text, Normalised) else normalise(text)
    key = f" {norm.key} "
    found: set[str] = set()
    for size in (2, 3, 4):
        found.update(key[i:i + size] for i in range(len(key) - size + 1))
    found.update(c for c in key if _cjk(c))
    found.update(f"w:{w}" for w in norm.words)
    found.update(f"b:{a} {b}" for a, b in pairwise(norm.words))
    found.update(signals(norm.clean))
    return found


@dataclass(frozen=True, slots=True)
class NgramModel:
    """Weights per feature (one per category), intercepts and thresholds."""

    categories: tuple[str, ...]
    weights: Mapping[str, tuple[float, ...]]
    intercepts: tuple[float, ...]
    thresholds: Mapping[str, float]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NgramModel:
        """The model as ``bench/train_moderation.py`` writes it."""
        categories = tuple(data["categories"])
        return cls(
            categories,
            {f: tuple(w) for f, w in data["weights"].items()},
            tuple(data["intercepts"]),
            dict(data["thresholds"]),
        )

    def scores(self, text: str | Normalised) -> dict[str, float]:
        """The probability of each category for ``text``."""
        weights = self.weights
        known = [weights[f] for f in features(text) if f in weights]
        if not known:
            return {c: _sigmoid(b) for c, b in zip(self.categories, self.intercepts, strict=True)}
        # Binary features, L2-normalised over the known ones (as in training); the
        # columns are summed by zip/sum, in C, not weight by weight.
        scale = 1.0 / math.sqrt(len(known))
        return {c: _sigmoid(b + scale * math.fsum(column)) for c, b, column
                in zip(self.categories, self.intercepts, zip(*known, strict=True), strict=True)}


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def load_model() -> NgramModel:
    """The model shipped with Parley."""
    raw = resources.files("core.moderation").joinpath(MODEL_FILE).read_bytes()
    return NgramModel.from_json(json.loads(gzip.decompress(raw)))


class NgramClassifier(ServiceBase):
    """The shipped n-gram model as a classifier (``classifier = "ngram"``)."""

    def __init__(self, model: NgramModel | None = None) -> None:
        self._model = model

    async def _start(self) -> None:
        if self._model is None:
            self._model = await asyncio.to_thread(load_model)

    @property
    def thresholds(self) -> Mapping[str, float]:
        """The thresholds chosen on the development set, by category (once started)."""
        return self._model.thresholds if self._model is not None else {}

    def _loaded(self) -> NgramModel:
        if self._model is None:
            raise RuntimeError("NgramClassifier is used before start()")
        return self._model

    def score_now(self, text: str) -> dict[str, float]:
        """Scores by category, computed on the calling thread (tens of microseconds)."""
        return self._loaded().scores(text)

    def score_normalised(self, text: Normalised) -> dict[str, float]:
        """:meth:`score_now` of a message already normalised (saves doing it twice)."""
        return self._loaded().scores(text)

    async def score(self, text: str) -> dict[str, float]:
        """See :meth:`score_now`."""
        return self.score_now(text)

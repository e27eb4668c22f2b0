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
import operator
import re
from collections import deque
from collections.abc import Mapping
from importlib import resources
from itertools import pairwise
from typing import Any

from core.lifecycle import ServiceBase
from core.moderation.normalise import Normalised, normalise

MODEL_FILE = "ngram_model.json.gz"
_URL = re.compile(r"https?://|www\.|\b[\w-]+\.(?:com|net|org|xyz|top|biz|ru|cn|click|gg|io|"
                  r"fr|de|es|co|me|ly|info|site|online)\b", re.IGNORECASE)
# Eight of one character in a row (only ever asked whether there are): spelt as seven
# back-references, not ``\1{7,}``, which sends re through its general repeat at each
# character (2-3x the time; there is a run of 8 or more wherever there is one of 8).
_CHAR_RUN = re.compile(r"(.)" + r"\1" * 7)


def _cjk(char: str) -> bool:
    return "\u2e80" <= char < "\ua000" or "\uac00" <= char < "\ud7b0"


# ASCII bytes other than letters, and other than capitals: deleted, the rest is counted.
_NOT_LETTERS = bytes(c for c in range(128) if not chr(c).isalpha())
_NOT_CAPITALS = bytes(c for c in range(128) if not chr(c).isupper())


def signals(clean: str) -> list[str]:
    """Features of the raw text that normalisation takes away (for spam)."""
    found: list[str] = []
    # Every form of a link has a "." or "://": most messages need no search.
    if ("." in clean or "://" in clean) and _URL.search(clean):
        found.append("#url")
    if clean.isascii():
        # The letters and the capitals counted in C (the same counts as below).
        # The capitals first: under 6 of them (most texts) cannot be 70 % of 8 letters.
        raw = clean.encode("ascii")
        capitals = len(raw.translate(None, _NOT_CAPITALS))
        if capitals >= 6:
            letters = len(raw.translate(None, _NOT_LETTERS))
            if letters >= 8 and capitals >= 0.7 * letters:
                found.append("#caps")
    else:
        alpha = [c for c in clean if c.isalpha()]
        if len(alpha) >= 8 and sum(c.isupper() for c in alpha) >= 0.7 * len(alpha):
            found.append("#caps")
    if _CHAR_RUN.search(clean):
        found.append("#run")
    words = clean.lower().split()
    if len(words) >= 4 and len(set(words)) <= len(words) / 3:
        found.append("#repeat")
    if clean.count("!") >= 3:
        found.append("#bang")
    return found


def word_features(word: str) -> list[str]:
    """The features of one normalised word: its character 2- to 4-grams with word
    boundaries (`` wo``, ``rd ``), the word itself (``w:word``) and, for Chinese and
    other CJK runs, each character."""
    padded = f" {word} "
    found = [padded[i:i + size] for size in (2, 3, 4) for i in range(len(padded) - size + 1)]
    found.append(f"w:{word}")
    if not word.isascii():
        found += [c for c in word if _cjk(c)]
    return found


def features(text: str | Normalised) -> list[str]:
    """The features of ``text``, with repeats: :func:`word_features` of each distinct
    normalised word, each distinct pair of neighbouring words (``b:a b``) and
    :func:`signals`. A word or pair said again adds nothing (a long message that repeats
    itself scores as it would once).

    Every feature belongs to one word or one pair, so a message's features are the sum
    of its words' -- which is what lets :class:`NgramModel` cache them by word and the
    output guard score a growing reply one new word at a time (:class:`ScoreWindow`).
    """
    norm = text if isinstance(text, Normalised) else normalise(text)
    found: list[str] = []
    for word in dict.fromkeys(norm.words):
        found += word_features(word)
    found += dict.fromkeys(f"b:{a} {b}" for a, b in pairwise(norm.words))
    found += signals(norm.clean)
    return found


# A word's (or pair's) part of a score: the summed weights of its known features per
# category (None if it has none) and how many known features it has.
_Part = tuple[tuple[float, ...] | None, int]
_CACHE_WORDS = 20_000  # words whose parts are kept (cleared when full)
# A text would need this many known features (terabytes of text) to overflow a lane of
# a packed sum (see NgramModel).
_MOST_KNOWN_BITS = 40


class NgramModel:
    """Weights per feature (one per category), intercepts and thresholds.

    A text's features are counted and scaled by one over the square root of how many
    known features it has (as in training), so its score is a sum of its words' parts
    divided by the root of their sizes: each word's part is computed once and cached.

    :meth:`scores` adds the parts exactly, in one integer: every weight is a whole
    multiple of ``2**-shift`` (its last bit), and so is every part (an exact sum of
    weights, rounded once: a coarser multiple, if any), so a part is a whole number of
    those per category, and the categories are packed side by side in one Python int,
    each in a lane wide enough for any text. A text's parts are added as ints, and each
    lane, made a float (rounded once, half to even), is what ``math.fsum`` of the
    category's column gives: the exact sum, correctly rounded -- the same scores to the
    last bit (tests/test_ngram.py checks), for one int addition a part instead of a
    column of floats each. How many known features a part has is counted in the same
    int, in a lane above the categories'.
    """

    def __init__(self, categories: tuple[str, ...], weights: Mapping[str, tuple[float, ...]],
                 intercepts: tuple[float, ...], thresholds: Mapping[str, float]) -> None:
        self.categories = categories
        self.weights = weights
        self.intercepts = intercepts
        self.thresholds = thresholds
        self._words: dict[str, _Part] = {}
        # The packed parts (see the class docstring): of words, by word (cached), of
        # pairs of neighbouring words, by the pair, and of the signals found (32 at most).
        nonzero = [x for vector in weights.values() for x in vector if x]
        # x == m * 2**e with 0.5 <= |m| < 1: its last bit is 2**(e - 53).
        self._shift = max((53 - math.frexp(x)[1] for x in nonzero), default=0)
        top = max((math.frexp(x)[1] for x in nonzero), default=0)
        self._lane = _MOST_KNOWN_BITS + top + self._shift + 2
        self._half = 1 << (self._lane - 1)
        self._mask = (1 << self._lane) - 1
        self._offsets = tuple(i * self._lane for i in range(len(categories)))
        # Each lane is kept non-negative by half its range, so lanes never borrow.
        self._bias = sum(self._half << at for at in self._offsets)
        self._known_at = self._lane * len(categories)  # the count's lane, above them all
        self._packed: dict[str, int] = {}
        self._pairs = {(pair[0], pair[1]): self._pack(vector) + (1 << self._known_at)
                       for name, vector in weights.items()
                       if name.startswith("b:") and len(pair := name[2:].split(" ")) == 2}
        self._signals: dict[tuple[str, ...], int] = {}
        self._lanes = tuple(zip(categories, intercepts, self._offsets, strict=True))

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

    def _sum(self, names: list[str]) -> _Part:
        weights = self.weights
        known = [weights[f] for f in names if f in weights]
        if not known:
            return None, 0
        return tuple(map(math.fsum, zip(*known, strict=True))), len(known)

    def _pack(self, vector: tuple[float, ...] | None) -> int:
        """``vector`` (weights, or a sum of them) as whole multiples of ``2**-shift``,
        one lane per category."""
        if vector is None:
            return 0
        packed = 0
        for x, at in zip(vector, self._offsets, strict=True):
            whole = math.ldexp(x, self._shift)  # exact: a power of two
            if whole != int(whole):
                raise ValueError(f"n-gram model: {x!r} is finer than 2**-{self._shift}")
            packed += int(whole) << at
        return packed

    def _packed_part(self, names: list[str]) -> int:
        """The part of ``names`` packed, with how many of them are known (see the class
        docstring)."""
        vector, count = self._sum(names)
        return self._pack(vector) + (count << self._known_at)

    def word_part(self, word: str) -> _Part:
        """``word``'s part of a score (cached)."""
        part = self._words.get(word)
        if part is None:
            part = self._sum(word_features(word))
            if len(self._words) >= _CACHE_WORDS:
                self._words.clear()
            self._words[word] = part
        return part

    def pair_part(self, first: str, second: str) -> _Part:
        """The part of the pair of neighbouring words ``first second``."""
        weights = self.weights.get(f"b:{first} {second}")
        return (weights, 1) if weights is not None else (None, 0)

    def probabilities(self, vectors: list[tuple[float, ...]], known: int) -> dict[str, float]:
        """The probability of each category for a text whose ``known`` features' weights
        are ``vectors`` (the parts' vectors; fsum's sum of each column is exact, then
        rounded once, so their order does not matter)."""
        if not known:
            return {c: _sigmoid(b) for c, b in zip(self.categories, self.intercepts, strict=True)}
        scale = 1.0 / math.sqrt(known)
        return {c: _sigmoid(b + scale * math.fsum(column)) for c, b, column
                in zip(self.categories, self.intercepts, zip(*vectors, strict=True),
                       strict=True)}

    def scores(self, text: str | Normalised) -> dict[str, float]:
        """The probability of each category for ``text``; 0 for a single word (other
        than a run of Chinese): too little for this model, and the term lists' job."""
        norm = text if isinstance(text, Normalised) else normalise(text)
        words = norm.words
        if len(words) < 2 and not (words and _scored_alone(words[0])):
            return dict.fromkeys(self.categories, 0.0)
        # The packed parts of each distinct word and pair and of the signals, in any order.
        packed = self._packed
        total = 0
        for word in set(words):
            part = packed.get(word)
            if part is None:
                part = self._packed_part(word_features(word))
                if len(packed) >= _CACHE_WORDS:
                    packed.clear()
                packed[word] = part
            total += part
        pairs = self._pairs
        for pair in set(pairwise(words)):  # as pair_part()
            value = pairs.get(pair)
            if value is not None:
                total += value
        found = tuple(signals(norm.clean))
        part = self._signals.get(found)
        if part is None:
            part = self._signals[found] = self._packed_part(list(found))
        # With the bias, every lane is whole, and above them is the count of known ones.
        total += part + self._bias
        known = total >> self._known_at
        if not known:
            return self.probabilities([], 0)
        # Each lane, less its bias, made a float (correctly rounded), less the shift; then
        # _sigmoid written out (no call for each of the seven).
        mask, half, shift = self._mask, self._half, -self._shift
        scale = 1.0 / math.sqrt(known)
        exp, ldexp = math.exp, math.ldexp
        out: dict[str, float] = {}
        for c, b, at in self._lanes:
            x = b + scale * ldexp(((total >> at) & mask) - half, shift)
            if x >= 0:
                out[c] = 1.0 / (1.0 + exp(-x))
            else:
                z = exp(x)
                out[c] = z / (1.0 + z)
        return out


class ScoreWindow:
    """Scores of the last ``size`` words of a growing text, fed piece by piece: each
    piece costs its own words, not the whole window again (for the output guard).

    Pieces should end at a word boundary; the raw-text :func:`signals` (links, shouting:
    spam's) are not part of a window's score.
    """

    def __init__(self, model: NgramModel, size: int) -> None:
        self._model = model
        self._size = size
        self._order: deque[tuple[str, str]] = deque()  # (word, pair key) in the window
        self._counts: dict[str, int] = {}  # how often each word or pair is in it
        self._sums = [0.0] * len(model.categories)
        self._known = 0
        self._last: str | None = None

    def feed(self, text: str | Normalised) -> dict[str, float]:
        """Add ``text`` (the next piece, maybe normalised already) and return the
        window's scores."""
        model = self._model
        weights = model.weights
        kept = model._words  # word_part's cache, asked first (the method only on a miss)
        counts = self._counts
        order = self._order
        size = self._size
        add = operator.add
        last = self._last
        for word in (text if isinstance(text, Normalised) else normalise(text)).words:
            # A pair is keyed as its feature ("b:first second"): no word has a colon.
            pair = f"b:{last} {word}" if last is not None else ""
            last = self._last = word
            order.append((word, pair))
            # A word or pair counts once however often it is in the window (as features()).
            before = counts.get(word, 0)
            counts[word] = before + 1
            if not before:
                vector, known = kept.get(word) or model.word_part(word)
                if vector is not None:
                    self._sums = list(map(add, self._sums, vector))
                self._known += known
            if pair:
                before = counts.get(pair, 0)
                counts[pair] = before + 1
                if not before:
                    vector = weights.get(pair)  # as model.pair_part()
                    if vector is not None:
                        self._sums = list(map(add, self._sums, vector))
                        self._known += 1
            if len(order) > size:
                old, old_pair = order.popleft()
                self._drop(old)
                if old_pair:
                    self._drop(old_pair)
        if len(order) < 2 and not (order and _scored_alone(order[0][0])):
            return dict.fromkeys(model.categories, 0.0)  # as NgramModel.scores
        if not self._known:
            return model.probabilities([], 0)
        # NgramModel.probabilities of the one part the window sums to (_sigmoid inline).
        scale = 1.0 / math.sqrt(self._known)
        exp = math.exp
        scores = {}
        for c, b, s in zip(model.categories, model.intercepts, self._sums, strict=True):
            x = b + scale * s
            if x >= 0:
                scores[c] = 1.0 / (1.0 + exp(-x))
            else:
                z = exp(x)
                scores[c] = z / (1.0 + z)
        return scores

    def _drop(self, name: str) -> None:
        left = self._counts[name] - 1
        if left:
            self._counts[name] = left
            return
        del self._counts[name]
        if name.startswith("b:"):
            vector, known = self._model.weights.get(name), 1
        else:
            vector, known = self._model.word_part(name)
        if vector is not None:
            self._sums = [s - v for s, v in zip(self._sums, vector, strict=True)]
            self._known -= known


def _scored_alone(word: str) -> bool:
    """Whether a text of this one word is scored: a run of Chinese (a sentence without
    spaces) is; a word of other scripts is the term lists' job."""
    return len(word) >= 3 and _cjk(word[0])


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

    def window(self, size: int) -> ScoreWindow:
        """A :class:`ScoreWindow` of the last ``size`` words (for the output guard)."""
        return ScoreWindow(self._loaded(), size)

    async def score(self, text: str) -> dict[str, float]:
        """See :meth:`score_now`."""
        return self.score_now(text)

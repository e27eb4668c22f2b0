"""Classifiers: scores in [0, 1] for a piece of text, by category or as one number.

The default, ``ngram``, is Parley's own multilingual n-gram model
(:mod:`core.moderation.ngram`), one score per category. ``profanity-check`` is the
English linear model alt-profanity-check ships (TF-IDF words into calibrated linear
SVMs), evaluated here in plain Python (microseconds instead of the package's
milliseconds, same numbers); its one score counts as ``insult``. External classifiers
(an OpenAI-compatible moderation endpoint, a guard model) are in
:mod:`core.moderation.external`; more register under the ``parley.classifiers``
entry-point group.
"""

from __future__ import annotations

import asyncio
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from core.config import BotSettings
from core.lifecycle import ServiceBase
from core.registry import Registry

# A classifier's answer: one score per category, or one score (read as "insult").
Scores = float | Mapping[str, float]
Scorer = Callable[[str], Scores]


def by_category(scores: Scores) -> Mapping[str, float]:
    """``scores`` as a mapping of category to score."""
    if type(scores) is dict or isinstance(scores, Mapping):  # a dict (most) asks no ABC
        return scores
    return {"insult": float(scores)}


class Classifier(Protocol):
    """Scores text by category; started before use, stopped after.

    It may also have ``thresholds`` (a mapping of category to its own threshold), used
    where the policy's ``thresholds`` name none.
    """

    async def start(self) -> None:
        """Load the model (idempotent)."""

    async def stop(self) -> None:
        """Release the model (idempotent)."""

    async def score(self, text: str) -> Scores:
        """How likely ``text`` is of each category (or abusive at all), in [0, 1]."""
        ...

    # A classifier that computes in-process, without I/O, may also offer
    # ``score_now(text) -> Scores``; Parley then calls it inline instead of awaiting
    # ``score`` under a timeout (which could not interrupt it anyway).


def scorer_now(classifier: Classifier) -> Scorer | None:
    """``classifier``'s synchronous ``score_now``, if it has one."""
    scorer = getattr(classifier, "score_now", None)
    return scorer if callable(scorer) else None


class NullClassifier(ServiceBase):
    """Scores everything 0: for bots that rely on terms alone."""

    async def score(self, text: str) -> float:
        """Always 0."""
        return 0.0


# sklearn's default token pattern: words of two or more word characters.
_WORD = re.compile(r"(?u)\b\w\w+\b")


class LinearProfanityClassifier(ServiceBase):
    """alt-profanity-check's model, evaluated without numpy; see the module docstring."""

    def __init__(self) -> None:
        # word -> (idf, weight of the word in each calibrated SVM)
        self._table: dict[str, tuple[float, tuple[float, ...]]] = {}
        self._intercepts: tuple[float, ...] = ()
        self._sigmoids: tuple[tuple[float, float], ...] = ()  # (a, b) of each calibrator

    async def _start(self) -> None:
        # Unpickling the model imports scikit-learn: a second or two, off the loop.
        self._table, self._intercepts, self._sigmoids = await asyncio.to_thread(_load_tables)

    async def _stop(self) -> None:
        self._table = {}

    def score_now(self, text: str) -> float:
        """The score of ``text``, computed on the calling thread (tens of microseconds)."""
        if not self._sigmoids:
            raise RuntimeError("LinearProfanityClassifier is used before start()")
        counts = Counter(_WORD.findall(text.lower()))
        table = self._table
        folds = len(self._intercepts)
        sums = [0.0] * folds
        norm = 0.0
        for word, count in counts.items():
            entry = table.get(word)
            if entry is None:
                continue
            idf, weights = entry
            value = count * idf
            norm += value * value
            for i in range(folds):
                sums[i] += value * weights[i]
        norm = math.sqrt(norm) or 1.0
        total = 0.0
        for i, (a, b) in enumerate(self._sigmoids):
            decision = sums[i] / norm + self._intercepts[i]
            total += _sigmoid(a * decision + b)
        return total / folds

    async def score(self, text: str) -> float:
        """See :meth:`score_now`."""
        return self.score_now(text)


def _sigmoid(x: float) -> float:
    # sklearn's sigmoid calibration: P = 1 / (1 + exp(a * f + b)).
    if x >= 0:
        return math.exp(-x) / (1.0 + math.exp(-x))
    return 1.0 / (1.0 + math.exp(x))


def _load_tables() -> tuple[
    dict[str, tuple[float, tuple[float, ...]]], tuple[float, ...], tuple[tuple[float, float], ...]
]:
    try:
        with warnings.catch_warnings():
            # The pickles come from an older scikit-learn; the linear parts are unchanged.
            warnings.simplefilter("ignore")
            from profanity_check import profanity_check as package
    except ImportError as exc:
        raise RuntimeError(
            "the profanity-check classifier needs alt-profanity-check "
            "(pip install 'parley[moderation]')"
        ) from exc
    vectorizer: Any = package.vectorizer
    model: Any = package.model
    calibrated = model.calibrated_classifiers_
    idf = vectorizer.idf_
    coefs = [c.estimator.coef_[0] for c in calibrated]
    table = {
        word: (float(idf[i]), tuple(float(coef[i]) for coef in coefs))
        for word, i in vectorizer.vocabulary_.items()
    }
    intercepts = tuple(float(c.estimator.intercept_[0]) for c in calibrated)
    sigmoids = tuple((float(c.calibrators[0].a_), float(c.calibrators[0].b_)) for c in calibrated)
    return table, intercepts, sigmoids


ClassifierFactory = Callable[[BotSettings], Classifier]


def classifiers() -> Registry[ClassifierFactory]:
    """Classifiers by name: ``ngram`` (the default), ``profanity-check``, ``none``, the
    external ``openai-moderation`` and ``guard-model``; more by entry point."""
    from core.moderation.external import GuardModelClassifier, OpenAIModerationClassifier
    from core.moderation.ngram import NgramClassifier

    registry: Registry[ClassifierFactory] = Registry("classifier", "parley.classifiers")
    registry.register("ngram", lambda settings: NgramClassifier())
    registry.register("profanity-check", lambda settings: LinearProfanityClassifier())
    registry.register("none", lambda settings: NullClassifier())
    registry.register("openai-moderation", OpenAIModerationClassifier.from_settings)
    registry.register("guard-model", GuardModelClassifier.from_settings)
    return registry

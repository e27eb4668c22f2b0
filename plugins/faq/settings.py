"""The ``[plugins.faq]`` table: the knowledge base file, the retriever and its thresholds."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from plugins.faq.retrieval import Thresholds

# Tuned on bench/data/faq/dev.jsonl and tuning.jsonl (bench/faq.py --sweep), never on
# heldout.jsonl; see docs/plugins.md. Embeddings: the best entry must be among BM25's 3
# best for a direct answer, and for context below the direct threshold; a direct answer
# needs at most 40 % of the question's topic words to be unknown to the knowledge base.
DEFAULT_THRESHOLDS = {
    "embeddings": Thresholds(direct=0.50, context=0.45, margin=0.10, agreement=3,
                             unknown_words=0.4),
    "bm25": Thresholds(direct=0.55, context=0.35, margin=0.04),
}


class FaqSettings(BaseModel):
    """How the FAQ answers. Thresholds left unset take the retriever's tuned defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str  # JSON or YAML, relative to the bot's TOML file
    retriever: Literal["embeddings", "bm25"] = "embeddings"
    model: str = "all-minilm-l6-v2"  # a preset or a local sentence-transformers folder
    direct_threshold: float | None = Field(default=None, ge=-1.0, le=2.0)
    context_threshold: float | None = Field(default=None, ge=-1.0, le=2.0)
    margin: float | None = Field(default=None, ge=0.0, le=2.0)
    agreement: int | None = Field(default=None, ge=0, le=100)  # 0: no second opinion
    unknown_words: float | None = Field(default=None, ge=0.0, le=1.0)  # 1: no check
    context_entries: int = Field(default=3, ge=1, le=10)
    unknown_reply: str = (
        "Sorry, I don't know the answer to that. Type /human to talk to a person."
    )
    context_instructions: str = (
        "Answer the user's question using only the FAQ entries below. If they do not "
        "answer it, say that you don't know and offer to hand over to a human."
    )

    @model_validator(mode="after")
    def _ordered(self) -> FaqSettings:
        t = self.thresholds
        if t.context > t.direct:
            raise ValueError("context_threshold must not be above direct_threshold")
        return self

    @property
    def thresholds(self) -> Thresholds:
        """The thresholds in force: the ones set here over the retriever's defaults."""
        base = DEFAULT_THRESHOLDS[self.retriever]
        return Thresholds(
            direct=base.direct if self.direct_threshold is None else self.direct_threshold,
            context=base.context if self.context_threshold is None else self.context_threshold,
            margin=base.margin if self.margin is None else self.margin,
            agreement=base.agreement if self.agreement is None else self.agreement,
            unknown_words=(base.unknown_words if self.unknown_words is None
                           else self.unknown_words),
        )

"""The FAQ plugin's retrieval: the knowledge-base file, BM25, embeddings and the decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import ConfigError
from plugins.faq.bm25 import BM25Index, tokenize
from plugins.faq.knowledge import Entry, load_entries
from plugins.faq.retrieval import (
    BM25Scorer,
    EmbeddingScorer,
    Outcome,
    Thresholds,
    Vocabulary,
    decide,
)

ROOT = Path(__file__).resolve().parents[1]
SUPPORT_FAQ = ROOT / "config" / "support" / "faq.json"

ENTRIES = [
    Entry("hours", ("When are you open?", "What are your opening hours?"), "9 to 5."),
    Entry("refund", ("How do I get a refund?", "Can I get my money back?"), "Within 30 days."),
    Entry("shipping", ("How much is shipping?", "Do you ship abroad?"), "Free over 50."),
]


def test_the_support_faq_loads_with_unique_ids() -> None:
    entries = load_entries(SUPPORT_FAQ)
    assert 25 <= len(entries) <= 40
    assert len({e.id for e in entries}) == len(entries)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[]", "non-empty list"),
        ("{not json", "not valid JSON"),
        ('[{"id": "a", "questions": ["q"]}]', "entries[0].answer"),
        ('[{"id": "a", "questions": [], "answer": "x"}]', "entries[0].questions"),
        ('[{"id": "a", "questions": ["q"], "answer": "x"},'
         ' {"id": "a", "questions": ["q"], "answer": "y"}]', "entries[1].id: 'a' is used twice"),
        ('[{"id": "a", "questions": ["q"], "answer": "x", "tags": []}]', "unknown key(s) tags"),
    ],
)
def test_a_bad_faq_file_names_the_file_and_the_entry(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "faq.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_entries(path)
    assert str(info.value).startswith(f"{path}: ")
    assert problem in str(info.value)


def test_yaml_files_load_too(tmp_path: Path) -> None:
    path = tmp_path / "faq.yaml"
    path.write_text("- id: hours\n  questions: ['When are you open?']\n  answer: 9 to 5.\n",
                    encoding="utf-8")
    assert load_entries(path) == [Entry("hours", ("When are you open?",), "9 to 5.")]


def test_tokenize_drops_stop_words_and_folds_plurals() -> None:
    assert tokenize("What are the radiator valves?") == ["radiator", "valve"]


def test_bm25_ranks_the_matching_document_first_and_unknown_words_lower_confidence() -> None:
    index = BM25Index(["opening hours of the shop", "refund policy", "shipping costs abroad"])
    scores = index.scores("shop opening hours")
    assert scores.index(max(scores)) == 0
    assert 0.9 <= scores[0] <= 1.5
    # The same match diluted by a word no document has is less sure of itself.
    assert index.scores("shop opening hours bitcoin")[0] < scores[0]
    assert index.scores("bitcoin") == [0.0, 0.0, 0.0]


def test_decide_answers_directly_puts_in_context_or_abstains() -> None:
    t = Thresholds(direct=0.8, context=0.5, margin=0.1)
    assert decide(ENTRIES, [0.9, 0.2, 0.1], t).outcome is Outcome.DIRECT
    # Sure enough but too close to the runner-up: the model chooses from both.
    close = decide(ENTRIES, [0.9, 0.85, 0.1], t)
    assert close.outcome is Outcome.CONTEXT
    assert [e.id for e, _ in close.ranked] == ["hours", "refund", "shipping"]
    assert decide(ENTRIES, [0.6, 0.1, 0.1], t).outcome is Outcome.CONTEXT
    assert decide(ENTRIES, [0.3, 0.1, 0.1], t).outcome is Outcome.ABSTAIN


def test_a_direct_answer_needs_the_second_opinion_to_agree() -> None:
    t = Thresholds(direct=0.8, context=0.5, margin=0.1, agreement=1)
    agrees, disagrees = [0.7, 0.1, 0.0], [0.0, 0.1, 0.7]
    assert decide(ENTRIES, [0.9, 0.2, 0.1], t, second_opinion=agrees).outcome is Outcome.DIRECT
    # Strong but unconfirmed: the model gets the entries; weaker and unconfirmed: abstain.
    assert decide(ENTRIES, [0.9, 0.2, 0.1], t,
                  second_opinion=disagrees).outcome is Outcome.CONTEXT
    assert decide(ENTRIES, [0.6, 0.1, 0.1], t,
                  second_opinion=disagrees).outcome is Outcome.ABSTAIN
    assert decide(ENTRIES, [0.6, 0.1, 0.1], t, second_opinion=agrees).outcome is Outcome.CONTEXT
    # Agreement within the second opinion's top 3: the best entry is always in it here.
    wide = Thresholds(direct=0.8, context=0.5, margin=0.1, agreement=3)
    assert decide(ENTRIES, [0.9, 0.2, 0.1], wide,
                  second_opinion=disagrees).outcome is Outcome.DIRECT


def test_a_question_about_words_the_faq_never_uses_is_not_answered_verbatim() -> None:
    vocabulary = Vocabulary(ENTRIES)
    assert vocabulary.unknown_share("what are your opening hours") == 0.0
    unknown = vocabulary.unknown_share("can I get my money back in bitcoin")
    assert unknown == pytest.approx(1 / 3)  # money, back, bitcoin
    assert vocabulary.unknown_share("hi there") == 0.0  # no topic words at all
    t = Thresholds(direct=0.8, context=0.5, margin=0.1, unknown_words=0.25)
    assert decide(ENTRIES, [0.1, 0.9, 0.1], t, unknown_share=0.0).outcome is Outcome.DIRECT
    assert decide(ENTRIES, [0.1, 0.9, 0.1], t,
                  unknown_share=unknown).outcome is Outcome.CONTEXT


def test_bm25_scorer_takes_each_entrys_best_question() -> None:
    scores = BM25Scorer(ENTRIES).scores("money back please")
    assert scores.index(max(scores)) == 1


@pytest.fixture(scope="module")
def embedding_scorer() -> EmbeddingScorer:
    return EmbeddingScorer(load_entries(SUPPORT_FAQ))


@pytest.mark.parametrize(
    ("question", "entry"),
    [
        ("I typed my password wrong too often and can't get in", "reset-password"),
        ("is there a monthly fee for the premium features", "plus-subscription"),
        ("can Alexa change the temperature for me", "voice-assistants"),
    ],
)
def test_embeddings_find_paraphrases(
    embedding_scorer: EmbeddingScorer, question: str, entry: str
) -> None:
    entries = load_entries(SUPPORT_FAQ)
    scores = embedding_scorer.scores(question)
    assert entries[scores.index(max(scores))].id == entry


def test_embeddings_of_an_off_topic_question_stay_below_the_direct_threshold(
    embedding_scorer: EmbeddingScorer,
) -> None:
    from plugins.faq.settings import DEFAULT_THRESHOLDS

    scores = embedding_scorer.scores("what is the boiling point of mercury")
    assert max(scores) < DEFAULT_THRESHOLDS["embeddings"].direct


def test_the_benchmark_sets_are_well_formed() -> None:
    ids = {e.id for e in load_entries(SUPPORT_FAQ)}
    for name, minimum in (("dev", 60), ("tuning", 100), ("heldout", 100)):
        rows = [json.loads(line) for line in
                (ROOT / "bench" / "data" / "faq" / f"{name}.jsonl").read_text().splitlines()]
        answerable = [r for r in rows if r["id"] is not None]
        assert len(answerable) >= minimum
        assert {r["id"] for r in answerable} <= ids
        assert any(r["id"] is None for r in rows)

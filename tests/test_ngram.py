"""The n-gram classifier's packed sum (core/moderation/ngram.py): the same scores, bit for
bit, as the parts' weights summed column by column with ``math.fsum``."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from core.moderation.ngram import NgramModel, _scored_alone, load_model, signals
from core.moderation.normalise import normalise
from tests.test_multiscan import bench_texts, moderation_test_texts


@pytest.fixture(scope="module")
def model() -> NgramModel:
    return load_model()


def fsum_scores(model: NgramModel, text: str) -> dict[str, float]:
    """NgramModel.scores as it was: the distinct words' and pairs' parts and the signals'
    part, each column summed by fsum (NgramModel.probabilities)."""
    words = normalise(text).words
    if len(words) < 2 and not (words and _scored_alone(words[0])):
        return dict.fromkeys(model.categories, 0.0)
    parts = [model.word_part(w) for w in set(words)]
    parts += [model.pair_part(a, b) for a, b in set(pairwise(words))]
    parts.append(model._sum(signals(normalise(text).clean)))
    vectors = [vector for vector, _ in parts if vector is not None]
    return model.probabilities(vectors, sum(known for _, known in parts))


def test_scores_are_the_fsum_scores_on_the_labelled_sets(model: NgramModel) -> None:
    texts = bench_texts() + moderation_test_texts() + [
        "hello number 3 from client 12, how are you today?", "y0u 4r3 stuuupid", "你是猪猪猪"]
    for text in texts:
        assert model.scores(text) == fsum_scores(model, text), text


@hsettings(max_examples=300, deadline=None)
@given(st.data())
def test_a_packed_sum_of_weights_is_fsum_of_them(model: NgramModel, data: st.DataObject) -> None:
    """Any parts (the model's weights, their sums, negated: near-cancelling columns too)
    packed, added as ints and unpacked are fsum of their columns, correctly rounded."""
    names = sorted(model.weights)
    picked = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=40))
    signs = data.draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=len(picked),
                               max_size=len(picked)))
    vectors = [tuple(sign * x for x in model.weights[name])
               for name, sign in zip(picked, signs, strict=True)]
    # A part is itself a (rounded) sum of weights: some of them, summed by fsum.
    vectors.append(tuple(map(math.fsum, zip(*vectors[: len(vectors) // 2 + 1], strict=True))))
    total = model._bias + sum(model._pack(v) for v in vectors)
    lanes = [math.ldexp(((total >> at) & model._mask) - model._half, -model._shift)
             for at in model._offsets]
    assert lanes == [math.fsum(column) for column in zip(*vectors, strict=True)]


def test_a_weight_finer_than_the_shift_is_refused(model: NgramModel) -> None:
    with pytest.raises(ValueError, match="finer"):
        model._pack((math.ldexp(1.0, -model._shift - 1),) * len(model.categories))

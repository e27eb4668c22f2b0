"""What a chat user expects of a reply's shape: no loops, no sentence cut mid-word, no
more sentences than asked for. Unit checks, then the tiny model through both schedulers.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from core.config import parse_settings
from core.errors import ConfigError
from core.generation.base import ChatMessage, GenerationRequest, SamplingParams, TokenDelta
from core.generation.local.decoding import TokenSink
from core.generation.local.generator import LocalGenerator
from core.generation.local.models import PRESETS, check_model_spec
from core.generation.local.prompt import render
from core.generation.local.repetition import ReplyRepetition, banned_tokens, penalize
from core.generation.local.ticket import Ticket
from core.generation.reply_shape import SentenceEnds, reply_limits

LONG = "hi"  # greedy on the tiny model runs on past 400 tokens after this


def test_sentence_ends_counts_ends_split_across_pushes() -> None:
    ends = SentenceEnds(max_sentences=2)
    shown = [ends.push(t) for t in ["Hello", " there", ".", " Version 3.5", " is out!",
                                    " And", " more."]]
    assert "".join(shown) == "Hello there. Version 3.5 is out!"
    assert ends.stopped and ends.count == 2


def test_sentence_ends_stops_at_the_first_end_once_wrapping_up() -> None:
    ends = SentenceEnds()
    assert ends.push("One. Two") == "One. Two"  # not wrapping up yet
    assert ends.push(" and", wrapping_up=True) == " and"
    assert ends.push(' "three." Four', wrapping_up=True) == ' "three."'
    assert ends.stopped
    assert ends.push(" five.") == ""


def shown_by(tokenizer: Any, text: str, **kwargs: Any) -> tuple[str, str | None]:
    """What a sink shows of ``text``'s tokens, fed one by one, and how it finished."""

    async def run() -> list[TokenDelta]:
        ticket = Ticket(GenerationRequest((ChatMessage("user", "x"),)),
                        asyncio.get_running_loop())
        sink = TokenSink(ticket, tokenizer, [], (), (), kwargs.pop("max_new", 400), **kwargs)
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if sink.push(token):
                break
        sink.finish("length")  # a no-op if the sink already finished
        await asyncio.sleep(0)  # deltas arrive through the loop
        deltas = []
        while not ticket.output.empty():
            deltas.append(ticket.output.get_nowait())
        return deltas

    deltas = asyncio.run(run())
    return "".join(d.text for d in deltas), deltas[-1].finish_reason


def test_the_sink_ends_replies_at_sentence_ends(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "The quick fox jumps. The dog sleeps near the river. Orders ship on time."
    assert shown_by(tokenizer, text, max_sentences=2) == (
        "The quick fox jumps. The dog sleeps near the river.", "stop")
    # Wrapping up from the 3rd token: the reply ends with its first sentence.
    assert shown_by(tokenizer, text, wrap_up_at=3) == ("The quick fox jumps.", "stop")
    # Without either, a limit cuts where it falls.
    cut, reason = shown_by(tokenizer, text, max_new=6)
    assert reason == "length" and not cut.endswith(".")


def test_reply_limits_wrap_up_at_three_quarters_and_allow_a_quarter_more() -> None:
    assert reply_limits(SamplingParams(max_new_tokens=96, finish_sentence=True)) == (120, 72)
    assert reply_limits(SamplingParams(max_new_tokens=96)) == (96, None)
    assert reply_limits(SamplingParams(max_new_tokens=96, finish_sentence=True,
                                       ignore_eos=True)) == (96, None)


def test_banned_tokens_are_the_ones_that_would_repeat_an_ngram() -> None:
    assert banned_tokens([5, 6, 7, 5, 6], 3) == {7}
    assert banned_tokens([5, 6, 7, 5, 6], 2) == {7}  # 6 was followed by 7
    assert banned_tokens([1, 2, 3], 1) == {1, 2, 3}
    assert banned_tokens([1, 2, 3], 0) == set()
    assert banned_tokens([1], 3) == set()


def test_penalize_scales_used_tokens_and_bans_ngrams() -> None:
    row = torch.tensor([2.0, -2.0, 1.0, 0.5, 3.0])
    penalize(row, [0, 1, 0], 2.0, 0)
    assert row.tolist() == [1.0, -4.0, 1.0, 0.5, 3.0]  # each used token once
    row = torch.tensor([0.0, 0.0, 0.0, 0.0])
    penalize(row, [1, 2, 1], 1.0, 2)
    assert row.tolist() == [0.0, 0.0, float("-inf"), 0.0]


def test_reply_repetition_never_looks_at_the_prompt() -> None:
    processor = ReplyRepetition(prompt_length=3, penalty=1.0, ngram=2)
    scores = torch.zeros(1, 6)
    # The prompt says "4 5" twice; the reply has only begun with 4: nothing is banned.
    out = processor(torch.tensor([[4, 5, 4, 4]]), scores)
    assert torch.isfinite(out).all()
    out = processor(torch.tensor([[4, 5, 4, 4, 5, 4]]), torch.zeros(1, 6))
    assert out[0].tolist()[5] == float("-inf")  # the reply's own "4 5" is banned after 4


def greedy_ids(model_dir: Path, processors: Sequence[Any] = (), max_new: int = 60) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = render(tokenizer, [ChatMessage("user", LONG)], "chat")
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                         logits_processor=LogitsProcessorList(list(processors)))
    return [int(t) for t in out[0][len(ids):]]


def repeated_bigrams(ids: Sequence[int]) -> int:
    return sum(n - 1 for n in Counter(itertools.pairwise(ids)).values() if n > 1)


def test_the_tiny_model_loops_and_the_ngram_ban_stops_it(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    prompt = len(render(AutoTokenizer.from_pretrained(tiny_model_dir),
                        [ChatMessage("user", LONG)], "chat"))
    plain = greedy_ids(tiny_model_dir, max_new=150)
    banned = greedy_ids(tiny_model_dir, [ReplyRepetition(prompt, 1.0, 2)], max_new=150)
    assert repeated_bigrams(plain) > 3  # without it, the tiny model repeats itself
    assert repeated_bigrams(banned) == 0


def local(model_dir: Path, batching: bool) -> LocalGenerator:
    return LocalGenerator(parse_settings({"bot": {"name": "tbot"}, "generation": {
        "model": str(model_dir), "device": "cpu", "dtype": "float32", "batching": batching}}))


async def reply(gen: LocalGenerator, **sampling: Any) -> str:
    params = SamplingParams(max_new_tokens=60, temperature=0.0, **sampling)
    stream: AsyncIterator[TokenDelta] = gen.stream(
        GenerationRequest((ChatMessage("user", LONG),), params))
    return "".join([d.text async for d in stream])


async def test_batched_and_sequential_repetition_control_agree(tiny_model_dir: Path) -> None:
    async with local(tiny_model_dir, batching=False) as sequential:
        plain = await reply(sequential)
        expected = await reply(sequential, repetition_penalty=1.5, no_repeat_ngram_size=3)
    async with local(tiny_model_dir, batching=True) as batched:
        together = await asyncio.gather(
            reply(batched, repetition_penalty=1.5, no_repeat_ngram_size=3),
            reply(batched),  # a neighbour in the same batch without any
            reply(batched, repetition_penalty=1.5, no_repeat_ngram_size=3),
        )
    assert expected != plain  # the settings change the reply ...
    assert together == [expected, plain, expected]  # ... the same way in a batch, per request


def test_the_model_setting_is_checked_before_anything_loads(tmp_path: Path) -> None:
    assert check_model_spec("smollm2-135m", "x.toml") == "preset"
    assert check_model_spec("HuggingFaceTB/SmolLM2-360M-Instruct", "x.toml") == "hub"
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match=r"holds no config\.json"):
        check_model_spec(str(tmp_path / "m"), "x.toml")
    (tmp_path / "m" / "config.json").write_text("{}")
    assert check_model_spec(str(tmp_path / "m"), "x.toml") == "path"
    with pytest.raises(ConfigError, match=r"x\.toml: generation\.model: '/no/such/dir': no such"):
        check_model_spec("/no/such/dir", "x.toml")
    with pytest.raises(ConfigError) as err:
        check_model_spec("smolm2-135m", "x.toml")
    assert "unknown model preset 'smolm2-135m' (did you mean 'smollm2-135m'?)" in str(err.value)
    assert all(name in str(err.value) for name in PRESETS)


def test_the_fleet_carries_the_reply_settings_to_its_workers() -> None:
    import json

    from core.generation.fleet.jobs import decode_job, encode_job

    params = SamplingParams(max_new_tokens=50, repetition_penalty=1.2, no_repeat_ngram_size=3,
                            finish_sentence=True, max_sentences=2)
    request = GenerationRequest((ChatMessage("user", "hi"),), params)
    assert decode_job({b"job": encode_job(request, 99.0)}).request.sampling == params
    # A job from a front end that predates these settings: the defaults.
    body = json.loads(encode_job(GenerationRequest((ChatMessage("user", "hi"),)), 1.0))
    for key in ("repetition_penalty", "no_repeat_ngram_size", "finish_sentence",
                "max_sentences"):
        del body["sampling"][key]
    old = decode_job({b"job": json.dumps(body).encode()}).request.sampling
    assert old == SamplingParams()

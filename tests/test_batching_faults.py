"""The local backend when transformers' internals do not behave: patches that no longer fit
are switched off at start, and a dead generation loop fails its requests, says so on
/readyz and is restarted. Every failure here is real: a patch whose assumptions do not
hold, or an exception raised inside the model's forward on the manager's thread."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bots.web.adapter import WebAdapter
from core.app import build_engine
from core.config import BotSettings, parse_settings
from core.engine import collect as collect_reply
from core.errors import GenerationError
from core.generation.base import ChatMessage, GenerationRequest, SamplingParams, TokenDelta
from core.generation.local import supervisor
from core.generation.local.batching import BatchingScheduler
from core.generation.local.generator import LocalGenerator
from core.generation.local.hf.attention import VarlenAttention
from core.generation.local.hf.patch import default_patches
from core.generation.local.hf.scheduler import NewcomersFirstSchedule
from core.generation.local.models import LoadedModel, load_model
from core.generation.local.sequential import SequentialScheduler
from core.types import IncomingMessage

LONG = "hi"  # the tiny model runs on past 400 tokens after this


def settings(model_dir: Path, **generation: Any) -> BotSettings:
    return parse_settings({"bot": {"name": "faults"}, "generation": {
        "model": str(model_dir), "device": "cpu", "dtype": "float32", **generation}},
        source="faults.toml")


def request(text: str, max_new_tokens: int = 40, user: str = "u") -> GenerationRequest:
    return GenerationRequest((ChatMessage("user", text),),
                             SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                             tenant="bot", user=user)


async def text_of(stream: AsyncIterator[TokenDelta]) -> str:
    return "".join([delta.text async for delta in stream])


def greedy_reference(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.generation.local.prompt import render

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = render(tokenizer, [ChatMessage("user", prompt)], "chat")
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return str(tokenizer.decode(out[0][len(ids):], skip_special_tokens=True).strip())


def renamed_kwargs_attention(module: Any, query: Any, key: Any, value: Any,
                             attention_mask: Any, **kwargs: Any) -> Any:
    """The per-request attention as it would be written against a transformers that
    named the batch boundaries ``cumulative_seqlens_*``: on this one the key is missing."""
    kwargs["cu_seq_lens_q"] = kwargs.pop("cumulative_seqlens_q")
    kwargs["cu_seq_lens_k"] = kwargs.pop("cumulative_seqlens_k")
    return VarlenAttention.function(module, query, key, value, attention_mask, **kwargs)


class AttentionForAnotherRelease(VarlenAttention):
    function = staticmethod(renamed_kwargs_attention)


class ScheduleThatIsNotUsed(NewcomersFirstSchedule):
    """Names its schedule under a key the manager does not look up, as when transformers
    renamed its scheduler registry: the check after start finds FIFO running."""

    def configure(self, generation: dict[str, Any], batching: dict[str, Any]) -> None:
        super().configure(generation, batching)
        batching["scheduler_type"] = "fifo"


async def test_patches_that_do_not_fit_are_switched_off_with_one_warning(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    prompt = "orders and refunds"
    expected = greedy_reference(tiny_model_dir, prompt, 30)
    patches = [AttentionForAnotherRelease(), ScheduleThatIsNotUsed(),
               *(p for p in default_patches() if p.name not in ("attention", "scheduler"))]
    caplog.set_level(logging.WARNING)
    async with LocalGenerator(settings(tiny_model_dir), patches=patches) as gen:
        sched = gen._scheduler
        assert isinstance(sched, BatchingScheduler)
        assert sched.patches == ["sampler", "cancellation"]
        replies = await asyncio.gather(*(text_of(gen.stream(request(prompt, 30, user=f"u{i}")))
                                         for i in range(3)))
        assert replies == [expected] * 3
        assert gen.readiness().ready
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "switched off" in r.getMessage()]
    assert len(warnings) == 1
    assert supervisor.transformers_version() in warnings[0]
    assert "attention (" in warnings[0] and "scheduler (" in warnings[0]
    assert "cumulative_seqlens_q" in warnings[0]


def without_paged_attention(model_dir: Path, batch_sizes: list[int]) -> LoadedModel:
    """The tiny model as an architecture without paged attention would behave: its forward
    raises whenever it is handed a paged cache (the batching manager's only way to call
    it, patched or not) and works as ever otherwise; records the batch of each call."""
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")

    def forward(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if "block_table" in kwargs:  # the paged cache's page table
            raise NotImplementedError("this model has no paged attention")
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch_sizes.append(int(ids.shape[0]))

    loaded.model.register_forward_pre_hook(forward, with_kwargs=True)
    return loaded


async def test_when_even_the_bare_manager_fails_requests_are_served_one_at_a_time(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    prompts = ["orders and refunds", "Hello there", "opening hours"]
    expected = [greedy_reference(tiny_model_dir, p, 20) for p in prompts]
    batch_sizes: list[int] = []
    caplog.set_level(logging.WARNING)
    gen = LocalGenerator(settings(tiny_model_dir),
                         load=lambda: without_paged_attention(tiny_model_dir, batch_sizes))
    async with gen:
        assert isinstance(gen._scheduler, SequentialScheduler)
        assert gen.readiness().ready
        log: list[tuple[int, str | None]] = []

        async def ask(i: int) -> str:
            text = ""
            async for delta in gen.stream(request(prompts[i], 20, user=f"u{i}")):
                log.append((i, delta.finish_reason))
                text += delta.text
            return text

        batch_sizes.clear()
        replies = await asyncio.gather(*(ask(i) for i in range(len(prompts))))
    assert replies == expected
    # One at a time: each reply ends before the next one's first piece, every forward
    # pass holds one sequence.
    order = [i for i, _ in log]
    assert order == sorted(order, key=order.index) and len(set(order)) == 3
    assert [i for i in dict.fromkeys(order)] == [i for i, reason in log if reason]
    assert batch_sizes and set(batch_sizes) == {1}
    fallback = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "one request at a time" in r.getMessage()]
    assert len(fallback) == 1
    assert supervisor.transformers_version() in fallback[0]
    assert "no paged attention" in fallback[0]


@contextmanager
def failing_forward(model: Any, *, times: int | None) -> Iterator[dict[str, int]]:
    """Make the model's forward raise, on whatever thread runs it, ``times`` times (None:
    until the block ends)."""
    state = {"left": times if times is not None else -1, "raised": 0}

    def hook(module: Any, args: Any, output: Any) -> None:
        if state["left"] != 0:
            state["left"] -= 1
            state["raised"] += 1
            raise RuntimeError("injected: the device fell over")

    handle = model.register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


def model_of(gen: LocalGenerator) -> Any:
    sched = gen._scheduler
    assert isinstance(sched, BatchingScheduler) and sched.runner is not None
    return sched.runner.loaded.model


async def test_a_dead_loop_fails_every_request_at_once_and_is_restarted(
    tiny_model_dir: Path,
) -> None:
    async with LocalGenerator(settings(tiny_model_dir, max_batch=2)) as gen:
        streams = [gen.stream(request(LONG, 400, user=f"u{i}")) for i in range(3)]
        await asyncio.gather(*(anext(s) for s in streams[:2]))  # two run, one waits
        tasks = [asyncio.create_task(text_of(s)) for s in streams]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with failing_forward(model_of(gen), times=1):
            results = await asyncio.gather(*tasks, return_exceptions=True)
        assert time.monotonic() - started < 5  # at once, not at a timeout
        # The running two hear it from the manager's own failure report, the waiting one
        # from the scheduler; each as a GenerationError naming the cause.
        assert all(isinstance(r, GenerationError) and "injected" in str(r) for r in results), \
            results
        state = gen.readiness()
        assert not state.ready and "injected" in state.reason and state.healthy
        deadline = time.monotonic() + 60
        while not gen.readiness().ready:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        reply = await text_of(gen.stream(request("orders and refunds", 20)))
        assert reply == greedy_reference(tiny_model_dir, "orders and refunds", 20)


async def test_a_loop_that_keeps_dying_gives_up_and_says_so_on_readyz(
    tiny_model_dir: Path,
) -> None:
    engine = build_engine(settings(tiny_model_dir, max_batch=2, max_new_tokens=400))
    async with engine:
        adapter = WebAdapter(engine.settings, {"port": 0})
        await adapter.start(engine)
        base = f"http://127.0.0.1:{adapter.port}"
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(base + "/readyz") as response:
                    assert response.status == 200
                assert isinstance(engine.generator, LocalGenerator)
                with failing_forward(model_of(engine.generator), times=None) as state:
                    message = IncomingMessage(bot="faults", channel="web",
                                              conversation_id="c1", user_id="u1",
                                              message_id="m1", text=LONG)
                    reply = await collect_reply(engine.handle(message))
                    assert reply.kind.value == "error" and reply.text  # the apology
                    # The apology can come (from the manager's own failure report) a
                    # moment before the supervisor sees the thread gone.
                    deadline = time.monotonic() + 5
                    while True:
                        async with http.get(base + "/readyz") as response:
                            if response.status == 503:
                                body = await response.json()
                                break
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.02)
                    assert "generation loop died" in body["reason"]
                    assert "injected" in body["reason"]
                    deadline = time.monotonic() + 60
                    while engine.generator.readiness().healthy:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.1)
                    # The first death and every restart's self-check forward raised.
                    assert state["raised"] == 1 + supervisor.MAX_RESTARTS
                async with http.get(base + "/readyz") as response:
                    assert response.status == 503
                    assert "gave up" in (await response.json())["reason"]
                async with http.get(base + "/healthz") as response:
                    assert response.status == 503
                with pytest.raises(GenerationError, match="down"):
                    await text_of(engine.generator.stream(request("hello", 5)))
        finally:
            await adapter.stop()

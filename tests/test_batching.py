"""Continuous batching on the tiny model: same tokens as generate, fair, bounded, cancellable."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.config import BotSettings, parse_settings
from core.errors import GeneratorBusy
from core.generation.base import ChatMessage, GenerationRequest, SamplingParams, TokenDelta
from core.generation.local.batching import BatchingScheduler, FairQueue
from core.generation.local.generator import LocalGenerator
from core.generation.local.ticket import Ticket

LONG = "hi"  # the tiny model runs on past 400 tokens after this
ENDS = "Hello there"  # ... and stops by itself after this


def settings(model_dir: Path, **generation: Any) -> BotSettings:
    return parse_settings({"bot": {"name": "tbot"}, "generation": {
        "model": str(model_dir), "device": "cpu", "dtype": "float32", "batching": True,
        **generation}})


def request(text: str, max_new_tokens: int = 60, *, tenant: str = "bot",
            user: str = "u") -> GenerationRequest:
    return GenerationRequest((ChatMessage("user", text),),
                             SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                             tenant=tenant, user=user)


async def collect(stream: AsyncIterator[TokenDelta]) -> list[TokenDelta]:
    return [delta async for delta in stream]


def scheduler(gen: LocalGenerator) -> BatchingScheduler:
    sched = gen._scheduler
    assert isinstance(sched, BatchingScheduler)
    return sched


async def test_many_concurrent_greedy_requests_match_generate(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.generation.local.prompt import render

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [f"{word} number {i}" for i, word in
               enumerate(["hello", "orders", "refunds", "fox", "river", "tickets"] * 2)]
    expected = []
    for prompt in prompts:
        import torch

        ids = render(tokenizer, [ChatMessage("user", prompt)], "chat")
        out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
        expected.append(tokenizer.decode(out[0][len(ids):], skip_special_tokens=True).strip())
    async with LocalGenerator(settings(tiny_model_dir, max_batch=8)) as gen:
        replies = await asyncio.gather(*(collect(gen.stream(request(p, 40, user=p)))
                                         for p in prompts))
        assert ["".join(d.text for d in r) for r in replies] == expected
        assert scheduler(gen).running == 0 and scheduler(gen).waiting == 0


async def test_closing_a_stream_frees_its_slot_at_once(tiny_model_dir: Path) -> None:
    async with LocalGenerator(settings(tiny_model_dir, max_batch=1)) as gen:
        sched = scheduler(gen)
        stream = gen.stream(request(LONG, 400))
        async with contextlib.aclosing(stream):
            await anext(stream)
            await anext(stream)
        started = time.monotonic()
        deltas = await collect(gen.stream(request(ENDS, 100)))
        assert deltas[-1].finish_reason == "stop"
        assert time.monotonic() - started < 5  # not waiting for 400 tokens of the first
        await asyncio.sleep(0.05)
        assert sched.running == 0
        assert not sched._manager.output_router.result_handlers  # no handler left behind


async def test_a_full_queue_is_busy_at_once(tiny_model_dir: Path) -> None:
    async with LocalGenerator(settings(tiny_model_dir, max_batch=1, max_waiting=1)) as gen:
        running = gen.stream(request(LONG, 400))
        await anext(running)
        waiting = asyncio.create_task(collect(gen.stream(request(ENDS, 20))))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(GeneratorBusy, match="waiting"):
            await collect(gen.stream(request(ENDS, 20)))
        assert time.monotonic() - started < 0.5  # fails fast, not at the deadline
        await running.aclose()
        assert (await waiting)[-1].finish_reason is not None


async def test_a_request_that_cannot_start_in_time_is_busy_and_dropped(
    tiny_model_dir: Path,
) -> None:
    async with LocalGenerator(settings(tiny_model_dir, max_batch=1, timeout=0.3)) as gen:
        sched = scheduler(gen)
        running = gen.stream(request(LONG, 400))
        await anext(running)
        started = time.monotonic()
        with pytest.raises(GeneratorBusy):
            await collect(gen.stream(request(ENDS, 20)))
        assert 0.25 < time.monotonic() - started < 2
        await asyncio.sleep(0.05)
        assert sched.waiting == 0  # the abandoned request does not linger in the queue
        await running.aclose()


async def test_only_the_manager_s_thread_keeps_running_the_model(tiny_model_dir: Path) -> None:
    # A thread that ran the model keeps an OpenMP team while it lives; a second live team
    # (the self-check's forward pass on the loop's executor thread did this) stops idle
    # OpenMP workers from spinning and made every decode step pay wake-ups (c=1: 35 ->
    # 20 tok/s on 2 cores). Every thread that ran a forward pass must be gone, but one.
    import threading

    from torch.nn.modules.module import register_module_forward_pre_hook

    ran: set[threading.Thread] = set()
    handle = register_module_forward_pre_hook(
        lambda module, args: ran.add(threading.current_thread()))
    try:
        async with LocalGenerator(settings(tiny_model_dir, max_batch=4)) as gen:
            await collect(gen.stream(request("hello there", 8)))
            alive = [t.name for t in ran if t.is_alive()]
    finally:
        handle.remove()
    assert len(alive) == 1 and "generation_loop" in alive[0], alive


async def test_a_newcomer_is_prefilled_in_a_step_of_its_own(tiny_model_dir: Path) -> None:
    async with LocalGenerator(settings(tiny_model_dir, max_batch=4)) as gen:
        manager_scheduler = scheduler(gen)._manager.batch_processor.scheduler
        batches: list[list[tuple[str, int]]] = []
        plan = manager_scheduler.schedule_batch

        def recording(token_budget: int, cache_budget: int) -> Any:
            planned = plan(token_budget, cache_budget)
            if planned[0]:
                batches.append([(f.state.request_id, f.query_length) for f in planned[0]])
            return planned

        manager_scheduler.schedule_batch = recording
        running = [gen.stream(request(LONG, 400, user=f"u{i}")) for i in range(3)]
        for stream in running:
            await anext(stream)
        await anext(stream)  # the three are decoding together now
        newcomer = gen.stream(request("a newcomer with a prompt of several tokens", 5))
        await anext(newcomer)
        decoding = {rid for batch in batches for rid, length in batch if length == 1}
        prompt_steps = [batch for batch in batches
                        if any(length > 1 for _, length in batch)
                        and any(rid in decoding for rid, _ in batch)]
        # Every step that carried a prompt while others were decoding carried only prompts.
        assert prompt_steps
        assert all(length > 1 for batch in prompt_steps for _, length in batch)
        for stream in [*running, newcomer]:
            await stream.aclose()


async def test_a_flooding_tenant_does_not_starve_another(tiny_model_dir: Path) -> None:
    async with LocalGenerator(settings(tiny_model_dir, max_batch=4, max_per_user=64)) as gen:
        finished: list[str] = []

        async def ask(req: GenerationRequest, label: str) -> float:
            start = time.monotonic()
            first = None
            async for _delta in gen.stream(req):
                first = first or time.monotonic()
            finished.append(label)
            return (first or time.monotonic()) - start

        flood = [asyncio.create_task(ask(request(LONG, 400, tenant="flood", user=f"f{i}"),
                                         "flood")) for i in range(16)]
        sched = scheduler(gen)
        # Every slot taken, the rest queued (polled: the scheduler has no event for it).
        while sched.running < 4 or sched.waiting < 12:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        calm_ttft = await ask(request(ENDS, 20, tenant="calm", user="c"), "calm")
        flood_ttfts = await asyncio.gather(*flood)
        # The calm tenant got the first free slot: it finished before most of the flood,
        # and waited less than the flood's typical request.
        assert finished.index("calm") <= 4 + 1
        assert calm_ttft < sorted(flood_ttfts)[len(flood_ttfts) // 2]


async def test_one_user_cannot_take_every_slot(tiny_model_dir: Path) -> None:
    async with LocalGenerator(settings(tiny_model_dir, max_batch=8, max_per_user=2)) as gen:
        sched = scheduler(gen)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, sched._by_user["bot\x00greedy"])
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.gather(*(collect(gen.stream(request(LONG, 30, user="greedy")))
                                   for _ in range(6)))
        finally:
            watcher.cancel()
        assert peak == 2


def job(tenant: str, user: str = "u") -> Ticket:
    return Ticket(request("x", tenant=tenant, user=user), asyncio.new_event_loop())


def test_fair_queue_serves_the_least_served_tenant_round_robin() -> None:
    queue = FairQueue(max_waiting=10, max_per_user=1)
    jobs = [job("a", "a1"), job("a", "a2"), job("a", "a3"), job("b", "b1"), job("c", "c1")]
    for j in jobs:
        assert queue.push(j)
    running_t: Counter[str] = Counter({"a": 3})
    order = []
    while (j := queue.pop(running_t, Counter())) is not None:
        order.append(j.request.user)
        running_t[j.request.tenant] += 1
    assert order[:2] == ["b1", "c1"]  # tenants with nothing running go first
    assert order[2:] == ["a1", "a2", "a3"]


def test_fair_queue_is_bounded_and_respects_the_user_cap() -> None:
    queue = FairQueue(max_waiting=2, max_per_user=1)
    first, second = job("a", "same"), job("a", "same")
    assert queue.push(first) and queue.push(second)
    assert not queue.push(job("b"))  # full
    assert queue.pop(Counter(), Counter({"a\x00same": 1})) is None  # user at their cap
    assert queue.discard(first)
    assert not queue.discard(first)
    assert queue.pop(Counter(), Counter()) is second
    assert len(queue) == 0


def build_tiny_sliding_model(path: Path, tokenizer_dir: Path) -> Path:
    """A tiny Gemma 3 whose sliding window (8) is far shorter than its prompts."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=512, initializer_range=0.2, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    Gemma3ForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


async def test_per_request_attention_keeps_sliding_windows_exact(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.generation.local.prompt import render

    model_dir = build_tiny_sliding_model(tmp_path / "sliding", tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [f"{'the quick brown fox ' * (i + 2)}number {i}" for i in range(6)]
    expected = []
    for prompt in prompts:
        ids = render(tokenizer, [ChatMessage("user", prompt)], "chat")
        assert len(ids) > 16  # well past the window
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        expected.append(tokenizer.decode(out[0][len(ids):], skip_special_tokens=True).strip())
    async with LocalGenerator(settings(model_dir, max_batch=6)) as gen:
        replies = await asyncio.gather(*(collect(gen.stream(request(p, 24, user=p)))
                                         for p in prompts))
    assert ["".join(d.text for d in r) for r in replies] == expected


def test_nucleus_sampler_leaves_an_all_greedy_batch_to_the_argmax() -> None:
    import torch

    from core.generation.local.hf.sampler import NucleusSampler

    scores = torch.randn(5, 1000)
    out = NucleusSampler()(scores.clone(), torch.zeros(5).view(torch.int32))
    assert torch.equal(out.argmax(dim=1), scores.argmax(dim=1))


def test_nucleus_sampler_draws_from_exactly_the_nucleus() -> None:
    import torch

    from core.generation.local.hf.sampler import NucleusSampler

    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.05, 0.5, 0.15, 0.3], [0.25] * 4])
    draws = 4000
    scores = probs.log().repeat_interleave(draws, dim=0)
    top_p = torch.tensor([0.7, 0.0, 1.0]).repeat_interleave(draws).view(torch.int32)
    torch.manual_seed(0)
    out = NucleusSampler(candidates=3)(scores.clone(), top_p)
    # Exactly one token per row is marked; the manager's runner takes it by argmax.
    assert torch.equal(torch.isfinite(out).sum(dim=1), torch.ones(3 * draws, dtype=torch.long))
    drawn = out.argmax(dim=1).view(3, draws)
    counts = [torch.bincount(row, minlength=4).tolist() for row in drawn]
    # 0.5 + 0.3 reaches 0.7: only tokens 1 and 3, in proportion 0.5 : 0.3.
    assert counts[0][0] == counts[0][2] == 0
    assert abs(counts[0][1] / draws - 0.5 / 0.8) < 0.03
    assert counts[1] == [0, draws, 0, 0]  # top_p = 0 is greedy
    # top_p = 1 keeps every candidate, and only the 3 candidates, about evenly.
    assert sum(1 for c in counts[2] if c) == 3
    assert all(abs(c / draws - 1 / 3) < 0.03 for c in counts[2] if c)


async def test_a_shared_persona_is_computed_once(tiny_model_dir: Path) -> None:
    """Prefix sharing: the persona's KV-cache pages are computed by the first request and
    reused by the next ones (the model computes fewer tokens); replies do not change."""
    persona = ChatMessage("system", "You are a helpful test model for orders, refunds and "
                                    "delivery times. Customers ask about opening hours.")
    asks = ["hello", "orders", "refunds", "fox"]
    results = {}
    for sharing in (False, True):
        async with LocalGenerator(settings(tiny_model_dir, prefix_sharing=sharing,
                                           kv_page_tokens=16)) as gen:
            before = gen.token_counts()
            replies = []
            for ask in asks:
                job = GenerationRequest((persona, ChatMessage("user", ask)),
                                        SamplingParams(max_new_tokens=20, temperature=0.0),
                                        tenant="bot", user="u")
                replies.append("".join(d.text for d in await collect(gen.stream(job))))
            after = gen.token_counts()
        assert before.computed is not None and after.computed is not None
        results[sharing] = (replies, after.prompt - before.prompt,
                            after.shared_prompt - before.shared_prompt,
                            after.computed - before.computed, after.generated - before.generated)
    (plain, prompt, shared, computed_off, generated), (with_sharing, *rest) = (
        results[False], results[True])
    assert with_sharing == plain
    assert rest[:2] == [prompt, shared] and rest[3] == generated
    page = 16
    assert shared >= 3 * 2 * page  # requests 2-4 begin like the one before, for pages
    assert computed_off == prompt + generated - len(asks)  # every token, but each last one
    assert rest[2] <= computed_off - 3 * 2 * page  # the shared pages were not recomputed

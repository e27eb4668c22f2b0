"""The shared worker against one-request-at-a-time ``generate``, same model, same prompts.

    python bench/generation.py                                  # smollm2-135m, CPU
    python bench/generation.py --model gemma3-270m --concurrency 1,8,32 --requests 32
    python bench/generation.py --device cuda --concurrency 1,8,32,64 --requests 128

On a machine that cannot carry a preset's weights, build the same architecture with
seeded random weights from its small files (config, generation config, tokenizer: a few
MB): the cost per token is the same, and greedy decoding of forced token counts works as
with the real weights (the words are gibberish)::

    python bench/generation.py --model smollm2-135m --save-architecture arch/smollm2-135m
    # copy arch/ over, then there:
    python bench/generation.py --model smollm2-135m --random-weights arch/smollm2-135m \
        --device cuda --concurrency 1,8,32,64 --requests 128

Prompts are multi-turn chats from the chitchat dataset (``pip install chitchat-dataset``).
Both sides decode greedily and exactly ``--max-new-tokens`` tokens (``ignore_eos``), so
they produce the same tokens; what differs is how many requests share each forward pass.
Prints, for each mode, output tokens/s, time to first
token (TTFT) and time per output token (TPOT) p50/p99, and tokens/s as a ratio to
sequential. ``--sequential-requests K`` times sequential on the first K prompts only
(its rate is per token, so the ratio stays fair) to keep CPU runs short; worker levels
below K use K prompts as well.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from core.config import parse_settings
from core.generation.base import ChatMessage, GenerationRequest, SamplingParams
from core.generation.local.generator import LocalGenerator
from core.generation.local.models import (
    PRESETS,
    cache_dir,
    dtype_for,
    ensure_converted,
    random_weights_model,
    resolve_device,
    save_architecture,
)


@dataclass
class Sample:
    ttft: float
    tpot: float | None
    order: int  # the how-many-th request to start


def chats(count: int, turns: int) -> list[tuple[ChatMessage, ...]]:
    """``count`` multi-turn chats ending with a user message, from chitchat-dataset."""
    import chitchat_dataset

    result: list[tuple[ChatMessage, ...]] = []
    for convo in chitchat_dataset.Dataset().values():
        groups = [" ".join(m["text"] for m in group) for group in convo["messages"]][:turns]
        if len(groups) < 2:
            continue
        if len(groups) % 2 == 0:
            groups = groups[:-1]
        messages = [ChatMessage("system", "You are a friendly person chatting online.")]
        for i, text in enumerate(groups):
            messages.append(ChatMessage("user" if i % 2 == 0 else "assistant", text[:600]))
        result.append(tuple(messages))
        if len(result) == count:
            break
    return result


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def serve(generator: LocalGenerator, messages: tuple[ChatMessage, ...],
                max_new_tokens: int, order: int, user: str) -> Sample | None:
    """One request, timed from submission: its TTFT and TPOT."""
    request = GenerationRequest(
        messages, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                 ignore_eos=True),
        tenant="bench", user=user,
    )
    start = time.perf_counter()
    first = last = None
    pieces = 0
    async for delta in generator.stream(request):
        if delta.text:
            pieces += 1
            last = time.perf_counter()
            first = first or last
    if first is None or last is None:
        return None
    return Sample(first - start, (last - first) / (pieces - 1) if pieces > 1 else None, order)


async def run(
    generator: LocalGenerator, prompts: list[tuple[ChatMessage, ...]], concurrency: int,
    max_new_tokens: int, stagger: float = 0.0,
) -> tuple[float, int, list[Sample]]:
    """Serve ``prompts`` with ``concurrency`` in flight; (seconds, tokens, samples).

    With ``stagger``, client i starts i * stagger seconds late, so requests keep arriving
    one by one into a running batch instead of all at once.
    """
    queue = list(reversed(prompts))
    samples: list[Sample] = []
    started = 0

    async def client(index: int) -> None:
        nonlocal started
        await asyncio.sleep(index * stagger)
        while queue:
            messages = queue.pop()
            order, started = started, started + 1
            sample = await serve(generator, messages, max_new_tokens, order,
                                 f"user{len(queue)}")
            if sample is not None:
                samples.append(sample)

    before = generator.tokens_generated
    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    return elapsed, generator.tokens_generated - before, samples


async def run_poisson(
    generator: LocalGenerator, prompts: list[tuple[ChatMessage, ...]], rate: float,
    max_new_tokens: int,
) -> tuple[float, int, list[Sample], float]:
    """Requests arriving at random (Poisson, ``rate`` per second, fixed seed), each on its
    own, as independent users do; (seconds, tokens, samples, mean requests in flight)."""
    rng = random.Random(0)
    samples: list[Sample] = []
    in_flight, area = 0, 0.0
    start = last = time.perf_counter()

    def count(change: int) -> None:
        nonlocal in_flight, area, last
        now = time.perf_counter()
        area += in_flight * (now - last)
        in_flight, last = in_flight + change, now

    async def one(order: int, messages: tuple[ChatMessage, ...]) -> None:
        count(+1)
        sample = await serve(generator, messages, max_new_tokens, order, f"user{order}")
        count(-1)
        if sample is not None:
            samples.append(sample)

    before = generator.tokens_generated
    tasks = []
    for order, messages in enumerate(prompts):
        tasks.append(asyncio.create_task(one(order, messages)))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return elapsed, generator.tokens_generated - before, samples, area / elapsed


def report(name: str, elapsed: float, tokens: int, samples: list[Sample],
           baseline: float | None, cpu: float) -> dict[str, float | str]:
    rate = tokens / elapsed
    ttft = [s.ttft for s in samples]
    tpot = [s.tpot for s in samples if s.tpot is not None]
    row: dict[str, float | str] = {
        "mode": name, "tokens": tokens, "seconds": round(elapsed, 2),
        "tok_s": round(rate, 2), "ratio": round(rate / baseline, 2) if baseline else 1.0,
        "ttft_p50": round(pct(ttft, 0.5), 3), "ttft_p99": round(pct(ttft, 0.99), 3),
        "tpot_p50": round(pct(tpot, 0.5), 4), "tpot_p99": round(pct(tpot, 0.99), 4),
        "cpu_ms_per_tok": round(1000 * cpu / max(1, tokens), 2),
    }
    print(f"{name:<14} {tokens:>6} tok {elapsed:>8.1f} s {rate:>9.1f} tok/s  "
          f"x{row['ratio']:<6} TTFT p50 {row['ttft_p50']:.3f}s p99 {row['ttft_p99']:.3f}s  "
          f"TPOT p50 {row['tpot_p50']:.4f}s p99 {row['tpot_p99']:.4f}s  "
          f"CPU {row['cpu_ms_per_tok']} ms/tok", flush=True)
    return row


def export_architecture(model: str, out: Path) -> None:
    """Write ``model``'s config and tokenizer files (no weights) to ``out``."""
    preset = PRESETS.get(model)
    source = ensure_converted(preset, cache_dir(None)) if preset else Path(model).expanduser()
    copied = save_architecture(source, out)
    total = sum(path.stat().st_size for path in copied)
    print(f"wrote {', '.join(path.name for path in copied)} ({total / 1e6:.1f} MB) to {out}")


async def main(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.save_architecture:
        export_architecture(args.model, Path(args.save_architecture))
        return
    prompts = chats(args.requests, args.turns)
    levels = [int(c) for c in args.concurrency.split(",")]
    # Random arrivals can bunch up past C: leave them room rather than queue them.
    widest = max([*levels, args.staggered, 2 * args.poisson])
    load = None
    model = args.model
    if args.random_weights:
        # Both sides build the same seeded weights, so greedy decoding agrees between them.
        model = args.random_weights
        load = partial(random_weights_model, Path(args.random_weights), like=args.model,
                       device=args.device, dtype=args.dtype)
    common = {"model": model, "device": args.device, "dtype": args.dtype,
              "temperature": 0.0,
              "max_new_tokens": args.max_new_tokens, "timeout": 3600.0}
    sequential = parse_settings({"bot": {"name": "bench"},
                                 "generation": {**common, "batching": False}})
    batched = parse_settings({"bot": {"name": "bench"}, "generation": {
        **common, "max_batch": widest, "max_per_user": widest,
        "batch_tokens": args.batch_tokens,
        "max_waiting": 4 * args.requests}})
    dtype = str(dtype_for(resolve_device(args.device), args.dtype)).removeprefix("torch.")
    weights = " (random weights)" if args.random_weights else ""
    print(f"model={args.model}{weights} device={args.device} dtype={dtype} "
          f"requests={len(prompts)} max_new_tokens={args.max_new_tokens} (greedy)", flush=True)
    rows = []
    async with LocalGenerator(sequential, load=load) as gen:
        count = args.sequential_requests or len(prompts)
        await run(gen, prompts[:1], 1, 4)  # warm-up
        cpu = time.process_time()
        elapsed, tokens, samples = await run(gen, prompts[:count], 1, args.max_new_tokens)
        rows.append(report("sequential", elapsed, tokens, samples, None,
                           time.process_time() - cpu))
    baseline = float(rows[0]["tok_s"])
    async with LocalGenerator(batched, load=load) as gen:
        await run(gen, prompts[:2], 2, 4)  # warm-up
        for level in levels:
            # Low concurrency levels need fewer requests for a steady figure.
            count = min(len(prompts), max(level, args.sequential_requests or len(prompts)))
            cpu = time.process_time()
            elapsed, tokens, samples = await run(gen, prompts[:count], level,
                                                 args.max_new_tokens)
            rows.append(report(f"worker c={level}", elapsed, tokens, samples, baseline,
                               time.process_time() - cpu))
        if args.staggered:
            # Arrivals spread over one request's duration at the lone rate, so that each
            # newcomer joins a batch already running; first-token latency is counted
            # once the batch is full (every request after the first wave).
            level = args.staggered
            lone = args.max_new_tokens / baseline
            cpu = time.process_time()
            elapsed, tokens, samples = await run(
                gen, prompts[: min(len(prompts), 3 * level)], level, args.max_new_tokens,
                stagger=lone / level,
            )
            steady = [s for s in samples if s.order >= level]
            rows.append(report(f"staggered c={level}", elapsed, tokens, steady, baseline,
                               time.process_time() - cpu))
        if args.poisson:
            # Arrivals at random at the rate that keeps about C requests in flight, given
            # the throughput measured at concurrency C (or the staggered run).
            level = args.poisson
            measured = next((float(r["tok_s"]) for r in rows
                             if r["mode"] in (f"worker c={level}", f"staggered c={level}")),
                            None)
            if measured is None:
                raise SystemExit(f"--poisson {level} needs --concurrency or --staggered {level}")
            rate = measured / args.max_new_tokens  # requests/s served with C in flight
            cpu = time.process_time()
            elapsed, tokens, samples, mean = await run_poisson(
                gen, prompts[: min(len(prompts), 4 * level)], rate, args.max_new_tokens)
            steady = [s for s in samples if s.order >= level]
            rows.append(report(f"poisson ~{mean:.1f}", elapsed, tokens, steady, baseline,
                               time.process_time() - cpu))
    print("JSON " + json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto",
                        help="weights for both sides: auto (bfloat16 on CUDA and AMX CPUs), "
                             "float32, bfloat16, float16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--sequential-requests", type=int, default=0)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--staggered", type=int, default=0, metavar="C",
                        help="also run C clients whose requests arrive one by one "
                             "(first-token latency in a running batch)")
    parser.add_argument("--poisson", type=int, default=0, metavar="C",
                        help="also send requests at random (Poisson) times, at the rate that "
                             "keeps about C in flight (needs C in --concurrency or --staggered)")
    parser.add_argument("--batch-tokens", type=int, default=512,
                        help="tokens per forward pass of the worker (prefill chunk)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's). On a CPU shared with other "
                             "work, 1: idle threads spin, and generate() with 2 threads on a "
                             "crowded 2-core machine spent 7x the CPU of 1")
    parser.add_argument("--random-weights", metavar="DIR",
                        help="build --model's architecture from DIR/config.json with seeded "
                             "random weights and DIR's tokenizer (see --save-architecture)")
    parser.add_argument("--save-architecture", metavar="DIR",
                        help="write --model's config and tokenizer files (no weights) to DIR "
                             "and exit")
    asyncio.run(main(parser.parse_args()))

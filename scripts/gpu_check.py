"""GPU correctness of the batching worker, for scripts/gpu-bundle's device run.

On a random-weights copy of the default preset (the weights do not travel): batched
greedy replies equal ``generate()``'s token for token (float32), and a sampled batch
completes. Usage: ``python scripts/gpu_check.py ARCH_DIR [DEVICE] [PROMPTS]``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from functools import partial
from pathlib import Path

import torch

from core.config import parse_settings
from core.generation.base import ChatMessage, GenerationRequest, SamplingParams
from core.generation.local.generator import LocalGenerator
from core.generation.local.models import random_weights_model
from core.generation.local.prompt import render


def ask(text: str, tokens: int, temperature: float, user: str) -> GenerationRequest:
    return GenerationRequest((ChatMessage("user", text),),
                             SamplingParams(max_new_tokens=tokens, temperature=temperature,
                                            repetition_penalty=1.0, no_repeat_ngram_size=0),
                             user=user)


async def main(arch: Path, device: str, count: int) -> None:
    load = partial(random_weights_model, arch, like="smollm2-135m", device=device,
                   dtype="float32")
    loaded = load()
    words = ["hello", "orders", "refunds", "fox", "river", "tickets"]
    prompts = [f"{w} number {i}, tell me more" for i, w in enumerate(words * 8)][:count]
    expected = []
    for prompt in prompts:
        ids = render(loaded.tokenizer, [ChatMessage("user", prompt)], "chat")
        out = loaded.model.generate(torch.tensor([ids], device=loaded.model.device),
                                    max_new_tokens=32, do_sample=False)
        expected.append(loaded.tokenizer.decode(out[0][len(ids):],
                                                skip_special_tokens=True).strip())
    del loaded
    settings = parse_settings({"bot": {"name": "gpu"}, "generation": {
        "model": str(arch), "device": device, "dtype": "float32", "batching": True,
        "max_batch": 32}})
    async with LocalGenerator(settings, load=load) as gen:

        async def one(prompt: str, tokens: int, temperature: float, user: str) -> str:
            return "".join([d.text async for d in gen.stream(ask(prompt, tokens,
                                                                  temperature, user))])

        got = await asyncio.gather(*(one(p, 32, 0.0, p) for p in prompts))
        same = sum(a == b for a, b in zip(got, expected, strict=True))
        print(f"greedy batched == generate(): {same}/{len(prompts)}")
        for a, b in zip(got, expected, strict=True):
            if a != b:
                print("  differs:", repr(a[:80]), "vs", repr(b[:80]))
        started = time.perf_counter()
        sampled = await asyncio.gather(*(one(p, 48, 0.8, f"s{i}")
                                         for i, p in enumerate(prompts * 2)))
        print(f"sampled batch of {len(sampled)}: {sum(bool(s) for s in sampled)} non-empty "
              f"in {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cuda",
                     int(sys.argv[3]) if len(sys.argv) > 3 else 24))

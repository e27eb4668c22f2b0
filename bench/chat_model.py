"""The model path as users meet it: chats through the HTTP API of a bot, natural replies.

    python bench/chat_model.py                                   # config/demo.toml
    python bench/chat_model.py --config config/support.toml --concurrency 32 --solo 6
    python bench/chat_model.py --prefix-sharing both             # on and off, in one run

Serves the bot file's engine (its memory, moderation, plugins and local model) on the web
channel (port 0, as ``parley run`` does) and drives ``POST /api/v1/chat`` with the
multi-turn conversations of ``bench/data/conversations/`` (each turn sent when the last
reply came): first ``--solo`` conversations one at a time, then ``--concurrency`` at
once. Replies are as long as the bot makes them (its ``max_new_tokens``, sentence
endings, end of turn), not forced.

For each part it prints output tokens/s and its ratio to one at a time, CPU time per
message (this process: HTTP, engine, model), and where the model's work goes, from the
local generator's counts:

- prefill: the share of the tokens a request puts through the model that are its prompt
  (prompt / (prompt + generated));
- shared: the share of the prompt that begins like the bot's previous prompt (its
  persona and instructions), which prefix sharing can compute once;
- computed: tokens the forward passes really computed, per message, and the share of
  prompt + generated tokens that prefix sharing saved.

``--prefix-sharing both`` runs everything twice, with ``generation.prefix_sharing`` on and
off, so that both sides are measured under the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.conversations import Conversation, load, settings_for
from bots.web.adapter import WebAdapter
from core.app import build_engine
from core.generation.local.generator import LocalGenerator, TokenCounts


@dataclass
class Part:
    """What one part of the run measured."""

    name: str
    messages: int
    errors: int
    seconds: float
    cpu: float
    counts: TokenCounts

    @property
    def tok_s(self) -> float:
        return self.counts.generated / self.seconds

    def line(self, baseline: float | None) -> str:
        c = self.counts
        asked = c.prompt + c.generated
        ratio = f"x{self.tok_s / baseline:.2f}" if baseline else "x1.00"
        computed = (f"computed {c.computed / self.messages:.0f}/msg "
                    f"(saved {1 - c.computed / asked:.0%})" if c.computed is not None else
                    "computed: not counted")
        per = self.messages
        return (f"{self.name:<22} {per:>4} msg {self.errors:>2} err "
                f"{self.seconds:>7.1f} s {self.tok_s:>7.1f} tok/s {ratio:<7} "
                f"cpu {1000 * self.cpu / per:>6.0f} ms/msg | "
                f"prompt {c.prompt / per:.0f}/msg, reply {c.generated / per:.1f}/msg, "
                f"prefill {c.prompt / asked:.0%}, "
                f"shared {c.shared_prompt / max(1, c.prompt):.0%}, {computed}")


def delta(after: TokenCounts, before: TokenCounts) -> TokenCounts:
    computed = (after.computed - before.computed
                if after.computed is not None and before.computed is not None else None)
    return TokenCounts(after.prompt - before.prompt, after.shared_prompt - before.shared_prompt,
                       after.generated - before.generated, computed)


async def converse(http: aiohttp.ClientSession, url: str, chat: Conversation,
                   tag: str) -> tuple[int, int]:
    """Send the chat's turns one after another; (messages, errors)."""
    errors = 0
    for turn, text in enumerate(chat.turns):
        body = {"conversation_id": f"{tag}-{chat.id}", "user_id": f"{tag}-{chat.id}",
                "text": text, "message_id": f"{tag}-{chat.id}-{turn}"}
        async with http.post(f"{url}/api/v1/chat", json=body) as response:
            reply = await response.json()
            errors += response.status != 200 or reply.get("kind") != "final"
    return len(chat.turns), errors


async def part(name: str, generator: LocalGenerator, http: aiohttp.ClientSession, url: str,
               chats: list[Conversation], concurrency: int) -> Part:
    """Serve ``chats``, ``concurrency`` of them at a time."""
    tag = "".join(ch if ch.isalnum() else "-" for ch in name)  # fresh conversations
    queue = list(reversed(chats))
    totals = [0, 0]

    async def client() -> None:
        while queue:
            sent, failed = await converse(http, url, queue.pop(), tag)
            totals[0] += sent
            totals[1] += failed

    before, cpu, started = generator.token_counts(), time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Part(name, totals[0], totals[1], time.perf_counter() - started,
                time.process_time() - cpu, delta(generator.token_counts(), before))


async def measure(args: argparse.Namespace, sharing: bool) -> list[Part]:
    settings = settings_for(Path(args.config), [
        "generation.temperature=0",  # the same replies on both sides (--set to change)
        *args.set, f"generation.prefix_sharing={'true' if sharing else 'false'}",
        f"generation.max_batch={args.concurrency}", "generation.max_per_user=4",
    ])
    chats = load()
    engine = build_engine(settings)
    async with engine:
        generator = engine.generator
        if not isinstance(generator, LocalGenerator):
            raise SystemExit("this benchmark measures the local backend")
        adapter = WebAdapter(settings, {"port": 0})
        await adapter.start(engine)
        url = f"http://127.0.0.1:{adapter.port}"
        label = f"sharing {'on' if sharing else 'off'}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as http:
                await converse(http, url, chats[-1], f"warmup-{sharing}")
                solo = await part(f"{label}, c=1", generator, http, url,
                                  chats[: args.solo], 1)
                print(solo.line(None), flush=True)
                many = await part(f"{label}, c={args.concurrency}", generator, http, url,
                                  chats[: args.chats], args.concurrency)
                print(many.line(solo.tok_s), flush=True)
        finally:
            await adapter.stop()
    return [solo, many]


async def main(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.prefix_sharing]
    print(f"# {args.config} {' '.join(args.set)}; {args.solo} chats one at a time, "
          f"{args.chats} chats {args.concurrency} at a time; load {os.getloadavg()[0]:.2f}",
          flush=True)
    for sharing in modes:
        await measure(args, sharing)
    print(f"# load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/demo.toml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a setting of the bot file (TOML value)")
    parser.add_argument("--solo", type=int, default=4, help="chats one at a time")
    parser.add_argument("--chats", type=int, default=32, help="chats in the concurrent part")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prefix-sharing", choices=("on", "off", "both"), default="on")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (on a crowded CPU, 1 wastes least time spinning)")
    args: Any = parser.parse_args()
    asyncio.run(main(args))

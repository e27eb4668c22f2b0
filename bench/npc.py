"""A village of NPCs talking to many players at once, through the HTTP API.

    python bench/npc.py                                  # 20 NPCs, 50 players, local model
    python bench/npc.py --npcs 20 --players 50 --solo 20 --turns 2 --max-new-tokens 32
    python bench/npc.py --generation echo                # the pipeline alone, no model

Builds a bot with ``--npcs`` generated cards (the example village's world lorebook
shared), serves it on the web channel (port 0), and drives it over HTTP with
``POST /api/v1/npc/{npc}/talk/stream``: first ``--solo`` lines one at a time, then
``--players`` players at once, each talking ``--turns`` times to its NPC (each line sent
when its last one ended). Prints, for both, lines/s and the time to the first streamed
piece of the line (p50/p99), and the ratio of the two lines/s, measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bots.web.adapter import WebAdapter
from core.app import build_engine
from core.config import parse_settings

ROOT = Path(__file__).resolve().parent.parent
TRADES = ["blacksmith", "innkeeper", "guard", "baker", "fisher", "healer", "miller",
          "hunter", "priest", "weaver"]
QUESTIONS = ["Good morning! What news from the village?", "Have you heard about the mine?",
             "Can you help me find the mayor?", "What do you sell here?"]


def write_village(folder: Path, npcs: int) -> None:
    """``npcs`` V2 cards, each with a small lorebook, and the example world book."""
    cards = folder / "cards"
    cards.mkdir()
    for i in range(npcs):
        trade = TRADES[i % len(TRADES)]
        card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
            "name": f"Villager{i}", "description": f"{{{{char}}}} is the village {trade}.",
            "personality": "friendly, brief", "scenario": f"At the {trade}'s place.",
            "first_mes": "Hello, traveller.", "mes_example": "",
            "character_book": {"entries": [{"keys": [trade, "mine"], "insertion_order": 1,
                                            "content": f"The {trade} lost a cousin in the mine."}]},
            "extensions": {"parley": {"actions": ["give_item", "open_shop"]}}}}
        (cards / f"npc{i}.json").write_text(json.dumps(card))
    (folder / "world.json").write_text((ROOT / "config/npc/world.json").read_text())


async def line(http: aiohttp.ClientSession, url: str, npc: str, player: str,
               text: str) -> tuple[float, float, bool]:
    """One streamed line: (time to first piece, total time, answered)."""
    started = time.perf_counter()
    first = None
    ok = False
    async with http.post(f"{url}/api/v1/npc/{npc}/talk/stream",
                         json={"player_id": player, "text": text,
                               "game_state": {"time_of_day": "morning"}}) as response:
        async for raw in response.content:
            if raw.startswith(b"event: delta") and first is None:
                first = time.perf_counter() - started
            elif raw.startswith(b"event: final"):
                ok = True
    total = time.perf_counter() - started
    return (first if first is not None else total), total, ok


def report(name: str, results: list[tuple[float, float, bool]], wall: float) -> float:
    answered = [r for r in results if r[2]]
    ttft = sorted(r[0] for r in answered) or [float("nan")]
    p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
    rate = len(answered) / wall
    print(f"{name:<14} {len(answered):>4}/{len(results):<4} lines  {rate:7.2f} lines/s  "
          f"TTFT p50 {statistics.median(ttft) * 1000:8.0f} ms  p99 {p99 * 1000:8.0f} ms  "
          f"({wall:.1f} s)")
    return rate


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_village(folder, args.npcs)
        settings = parse_settings({
            "bot": {"name": "village", "persona": "You voice villagers in a game."},
            "generation": {"backend": args.generation, "model": args.model,
                           "max_new_tokens": args.max_new_tokens, "temperature": 0.7},
            "memory": {"backend": "embedded", "window": 8},
            "moderation": {"backend": "passthrough"},
            "plugins": {"modules": ["plugins.npc"], "context_tokens": 1500,
                        "npc": {"cards": "cards", "world": "world.json"}},
        }, source=str(folder / "bot.toml"))
        engine = build_engine(settings)
        async with engine:
            adapter = WebAdapter(settings, {"port": 0})
            await adapter.start(engine)
            url = f"http://127.0.0.1:{adapter.port}"
            timeout = aiohttp.ClientTimeout(total=600)
            try:
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    await line(http, url, "npc0", "warmup", "Hello.")  # load the model
                    started = time.perf_counter()
                    alone = [await line(http, url, f"npc{p % args.npcs}", f"solo{p}",
                                        QUESTIONS[p % len(QUESTIONS)])
                             for p in range(args.solo)]
                    solo = report("one at a time", alone, time.perf_counter() - started)

                    async def player(p: int) -> list[tuple[float, float, bool]]:
                        return [await line(http, url, f"npc{p % args.npcs}", f"player{p}",
                                           QUESTIONS[(p + t) % len(QUESTIONS)])
                                for t in range(args.turns)]

                    started = time.perf_counter()
                    together = await asyncio.gather(*(player(p) for p in range(args.players)))
                    rate = report("all at once", [r for rs in together for r in rs],
                                  time.perf_counter() - started)
                    print(f"ratio (all at once / one at a time): {rate / solo:.2f}x")
            finally:
                await adapter.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--npcs", type=int, default=20)
    parser.add_argument("--players", type=int, default=50)
    parser.add_argument("--solo", type=int, default=10, help="lines one at a time")
    parser.add_argument("--turns", type=int, default=1, help="lines per player at once")
    parser.add_argument("--generation", default="local", help="local or echo")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"{args.npcs} NPCs, {args.players} players, generation {args.generation} "
          f"({args.model}, {args.max_new_tokens} new tokens)")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()

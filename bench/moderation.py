"""Evaluate the moderation filters on a labelled set, and time them.

    python bench/moderation.py [--rounds 20] [--show-misses] [--redis-url unix:///...]

Prints recall on abusive messages (refused: block, mute or escalate), the false-positive
rate on benign ones (anything but allow, benign-but-edgy included), PII recall (every
expected kind masked), and the latency of ``check_input`` per message (p50/p99) with
the default filters: size, terms, classifier, pii, injection, flood. Flood limits and
the violation ladder are set out of the way so each sample is judged on its own.
The set is bench/data/moderation/labelled.jsonl (hand-assembled; see docs/moderation.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import parse_settings
from core.moderation.base import Action
from core.moderation.moderator import FilterModerator
from core.types import IncomingMessage

DATA = Path(__file__).resolve().parent / "data" / "moderation" / "labelled.jsonl"
REFUSED = {Action.BLOCK, Action.MUTE, Action.ESCALATE}


def settings(redis_url: str | None) -> Any:
    moderation: dict[str, Any] = {
        "backend": "filters",
        "user_rate": 1_000_000, "conversation_rate": 1_000_000,
        "warn_at": 1e9, "mute_at": 1e9, "escalate_at": 1e9,
    }
    if redis_url:
        moderation.update(state="redis", url=redis_url, key_prefix=f"bench-{uuid.uuid4().hex[:8]}")
    return parse_settings({
        "bot": {"name": "bench"}, "generation": {"backend": "echo"},
        "memory": {"backend": "embedded"}, "moderation": moderation,
    })


def message(text: str, i: int) -> IncomingMessage:
    return IncomingMessage(bot="bench", channel="web", conversation_id=f"c{i}",
                           user_id=f"u{i}", message_id=uuid.uuid4().hex, text=text)


async def run(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line]
    moderator = FilterModerator(settings(args.redis_url))
    async with moderator:
        abusive = benign = pii = 0
        caught = false_pos = masked = 0
        misses: list[str] = []
        for i, row in enumerate(rows):
            verdict = await moderator.check_input(message(row["text"], i))
            if row["label"] == "abusive":
                abusive += 1
                ok = verdict.action in REFUSED
                caught += ok
            elif row["label"] == "benign":
                benign += 1
                ok = verdict.action is Action.ALLOW
                false_pos += not ok
            else:
                pii += 1
                kinds = row["tag"].split("+")
                ok = verdict.action is Action.MASK and all(f"[{k}]" in verdict.text for k in kinds)
                masked += ok
            if not ok:
                misses.append(f"  {row['label']:8} {row['tag']:12} {verdict.action:8} "
                              f"{verdict.reason or '-':24} {row['text']!r}")
        timings: list[float] = []
        for r in range(args.rounds):
            for i, row in enumerate(rows):
                msg = message(row["text"], i + r * len(rows))
                started = time.perf_counter()
                await moderator.check_input(msg)
                timings.append(time.perf_counter() - started)
    timings.sort()
    p50 = statistics.median(timings) * 1000
    p99 = timings[int(len(timings) * 0.99) - 1] * 1000
    print(f"labelled set: {len(rows)} samples ({abusive} abusive, {benign} benign incl. edgy, "
          f"{pii} with PII)")
    print(f"abusive recall      {caught / abusive:.3f}  ({caught}/{abusive})   goal >= 0.90")
    print(f"benign FPR          {false_pos / benign:.3f}  ({false_pos}/{benign})   goal <= 0.05")
    print(f"PII recall          {masked / pii:.3f}  ({masked}/{pii})   goal >= 0.95")
    state = "redis" if args.redis_url else "in-process"
    print(f"check_input latency p50 {p50:.3f} ms  p99 {p99:.3f} ms  "
          f"({len(timings)} calls, state {state})   goal p99 < 2 ms")
    if args.show_misses and misses:
        print("misses:")
        print("\n".join(misses))


def main() -> None:
    """Parse arguments and run the evaluation."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="timing passes over the set")
    parser.add_argument("--show-misses", action="store_true")
    parser.add_argument("--redis-url", help="keep the state in this Redis (e.g. unix:///...)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

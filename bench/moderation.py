"""Evaluate the moderation filters on the labelled sets, and time them.

    python bench/moderation.py [--rounds 5] [--show-misses] [--redis-url unix:///...]

Two sets in bench/data/moderation: ``dev.jsonl`` (the classifier is trained and the
rules are tuned on it) and ``heldout.jsonl`` (written first, never tuned on: only its
totals are printed, never its misses). For each, recall per category -- a message of
insult, threat, hate, sexual, selfharm, spam or injection counts as caught when it is
refused (block, mute or escalate), one with PII when every expected kind is masked --
and the false-positive rate on benign and on edgy-but-benign messages (anything but
allow). Then the latency of ``check_input`` per message (p50/p99) over both sets with
the default filters: size, terms, classifier, pii, injection, spam, flood. Flood limits
and the violation ladder are set out of the way so each message is judged on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import parse_settings
from core.moderation.base import Action, Verdict
from core.moderation.moderator import FilterModerator
from core.types import IncomingMessage

DATA = Path(__file__).resolve().parent / "data" / "moderation"
REFUSED = {Action.BLOCK, Action.MUTE, Action.ESCALATE}
CATEGORIES = ("insult", "threat", "hate", "sexual", "selfharm", "spam", "pii", "injection")
GOALS = {"recall": 0.90, "benign": 0.02, "edgy": 0.05}


def settings(redis_url: str | None, classifier: str) -> Any:
    moderation: dict[str, Any] = {
        "backend": "filters", "classifier": classifier,
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


def load(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()
            if line]


def correct(row: dict[str, Any], verdict: Verdict) -> bool:
    """Whether the verdict is right for the labelled row."""
    label = row["label"]
    if label in ("benign", "edgy"):
        return verdict.action is Action.ALLOW
    if label == "pii":
        return verdict.action is Action.MASK and all(
            f"[{k}]" in verdict.text for k in row["tag"].split("+"))
    return verdict.action in REFUSED


async def evaluate(moderator: FilterModerator, name: str, rows: list[dict[str, Any]],
                   show_misses: bool) -> dict[str, float]:
    total: Counter[str] = Counter()
    right: Counter[str] = Counter()
    misses: list[str] = []
    for i, row in enumerate(rows):
        verdict = await moderator.check_input(message(row["text"], i))
        ok = correct(row, verdict)
        total[row["label"]] += 1
        right[row["label"]] += ok
        if not ok and show_misses:
            misses.append(f"  {row['label']:9} {row['lang']:3} {verdict.action:8} "
                          f"{verdict.reason or '-':32} {row['text']!r}")
    langs = Counter(r["lang"] for r in rows)
    print(f"\n{name}: {len(rows)} messages; languages: "
          + ", ".join(f"{k} {v}" for k, v in langs.most_common()))
    results: dict[str, float] = {}
    for category in CATEGORIES:
        recall = right[category] / total[category] if total[category] else float("nan")
        results[category] = recall
        mark = "ok" if recall >= GOALS["recall"] else "below goal"
        print(f"  recall {category:10} {recall:.3f}  ({right[category]}/{total[category]})"
              f"   goal >= {GOALS['recall']:.2f}  {mark}")
    for label in ("benign", "edgy"):
        fp = total[label] - right[label]
        rate = fp / total[label] if total[label] else float("nan")
        results[f"fp_{label}"] = rate
        mark = "ok" if rate <= GOALS[label] else "above goal"
        print(f"  FP rate {label:9} {rate:.3f}  ({fp}/{total[label]})"
              f"   goal <= {GOALS[label]:.2f}  {mark}")
    if misses:
        print("  misses:")
        print("\n".join(misses))
    return results


async def run(args: argparse.Namespace) -> None:
    dev, heldout = load("dev.jsonl"), load("heldout.jsonl")
    moderator = FilterModerator(settings(args.redis_url, args.classifier))
    async with moderator:
        await evaluate(moderator, "development set (tuned on)", dev, args.show_misses)
        # Held-out: totals only; its misses are never printed, so nothing is tuned on it.
        await evaluate(moderator, "HELD-OUT set (never tuned on)", heldout, False)
        rows = dev + heldout
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
    state = "redis" if args.redis_url else "in-process"
    print(f"\ncheck_input latency p50 {p50:.3f} ms  p99 {p99:.3f} ms  ({len(timings)} calls, "
          f"classifier {args.classifier}, state {state})   goal p99 <= 2 ms")


def main() -> None:
    """Parse arguments and run the evaluation."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timing passes over the sets")
    parser.add_argument("--show-misses", action="store_true",
                        help="list the development set's misses (never the held-out set's)")
    parser.add_argument("--classifier", default="ngram",
                        help="ngram (default), profanity-check or none")
    parser.add_argument("--redis-url", help="keep the state in this Redis (e.g. unix:///...)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

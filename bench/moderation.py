"""Evaluate the moderation filters on the labelled sets, and time them.

    python bench/moderation.py [--rounds 5] [--show-misses] [--redis-url unix:///...]

Sets in bench/data/moderation: the development set, ``dev.jsonl`` and ``dev_chat.jsonl``
(the classifier is trained and the rules are tuned on them), and two held-out sets,
``heldout.jsonl`` and ``everyday_heldout.jsonl`` (ordinary chat, benign; both written
first, never tuned on: only their totals are printed, never their misses). For each,
recall per category -- a message of insult, threat, hate, sexual, selfharm, spam or
injection counts as caught when it is refused (block, mute or escalate), one with PII
when every expected kind is masked -- and the false-positive rate on benign and on
edgy-but-benign messages (anything but allow). Then the latency of ``check_input`` per
message (p50/p99) over all sets with the default filters: size, terms, classifier, pii,
injection, spam, flood. Flood limits and the violation ladder are set out of the way so
each message is judged on its own. Last, how the output guard releases a streamed reply:
time to the first shown character and the sizes of the pieces shown.
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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import parse_settings
from core.moderation.base import Action, ReplyWithheld, Verdict
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
        if not total[category]:
            continue
        recall = right[category] / total[category] if total[category] else float("nan")
        results[category] = recall
        mark = "ok" if recall >= GOALS["recall"] else "below goal"
        print(f"  recall {category:10} {recall:.3f}  ({right[category]}/{total[category]})"
              f"   goal >= {GOALS['recall']:.2f}  {mark}")
    for label in ("benign", "edgy"):
        if not total[label]:
            continue
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
    dev = load("dev.jsonl") + load("dev_chat.jsonl")
    heldout, everyday = load("heldout.jsonl"), load("everyday_heldout.jsonl")
    moderator = FilterModerator(settings(args.redis_url, args.classifier))
    async with moderator:
        await evaluate(moderator, "development set (tuned on)", dev, args.show_misses)
        if args.heldout:
            # Totals only; its misses are never printed, so nothing is tuned on it.
            await evaluate(moderator, "HELD-OUT set (never tuned on)", heldout, False)
            await evaluate(moderator, "HELD-OUT everyday chat (never tuned on)", everyday,
                           False)
        rows = dev + heldout + everyday
        wall: list[float] = []
        cpu: list[float] = []
        for r in range(args.rounds):
            for i, row in enumerate(rows):
                msg = message(row["text"], i + r * len(rows))
                started, started_cpu = time.perf_counter(), time.thread_time()
                await moderator.check_input(msg)
                cpu.append(time.thread_time() - started_cpu)
                wall.append(time.perf_counter() - started)
    if not wall:
        print("\ncheck_input latency: not measured (--rounds 0)")
        return
    state = "redis" if args.redis_url else "in-process"
    print(f"\ncheck_input latency ({len(wall)} calls, classifier {args.classifier}, "
          f"state {state}; goal p99 <= 2 ms)")
    # On a shared machine the wall clock includes time other processes ran; the CPU
    # time of this thread is what the checks themselves cost.
    for name, values in (("wall", wall), ("cpu ", cpu)):
        values.sort()
        p50 = statistics.median(values) * 1000
        p99 = values[int(len(values) * 0.99) - 1] * 1000
        print(f"  {name} p50 {p50:.3f} ms  p99 {p99:.3f} ms  max {values[-1] * 1000:.3f} ms")


REPLY = (
    "Sure, here is how to reset it. Open the settings page, choose the account tab and "
    "press the reset button at the bottom; the app asks you to confirm, and a minute "
    "later you get an e-mail with a link that is valid for one hour. If the link has "
    "expired, start again from the first step, or write to the support team, who can "
    "reset it for you by hand once they have checked who you are. Most people are done "
    "in under five minutes, and nothing in your history or your saved items is lost "
    "along the way, so there is no need to back anything up first."
)


async def stream_release(token_chars: int, token_ms: float) -> None:
    """How the output guard releases a streamed reply: the time to the first shown
    character (tokens held before the first release x ``token_ms``) and the sizes of
    the pieces shown, with the default output filters (terms, classifier, pii)."""
    from core.moderation.guard import GuardConfig, guard_stream
    from core.moderation.ngram import NgramClassifier
    from core.moderation.pii import PiiDetector
    from core.moderation.terms import TermFilter

    classifier = NgramClassifier()
    await classifier.start()
    terms = TermFilter.from_policy([], [])
    config = GuardConfig(terms=terms, pii=PiiDetector(["email", "phone", "card", "iban"]),
                         classify=classifier.score, classify_now=classifier.score_now,
                         threshold=0.9, hold_chars=160, replacement="-", fail_closed=True,
                         timeout=1.0, phrase_words=terms.phrase_words)
    tokens = [REPLY[i:i + token_chars] for i in range(0, len(REPLY), token_chars)]
    received = 0
    first: int | None = None

    async def source() -> AsyncIterator[str]:
        nonlocal received
        for token in tokens:
            received += 1
            yield token

    async def report(*args: Any) -> None:
        pass

    pieces: list[str] = []
    async for piece in guard_stream(source(), config, report):
        first = received if first is None else first
        pieces.append(piece)
    assert "".join(pieces) == REPLY and first is not None
    sizes = sorted(len(p) for p in pieces)
    print(f"\noutput guard, a {len(REPLY)}-character reply in {len(tokens)} tokens of "
          f"{token_chars} characters, one every {token_ms:.0f} ms:")
    print(f"  first character shown after token {first}: {first * token_ms:.0f} ms; "
          f"{len(pieces)} pieces shown, median {statistics.median(sizes):.0f} characters, "
          f"largest {sizes[-1]}")


async def guard_false_alarms(count: int) -> None:
    """How many ordinary chat turns the output guard withholds, streamed word by word as
    replies with the default filters: ``count`` turns of the chitchat-dataset package,
    from its 1,001st conversation on (the trainer's benign examples come from the first
    conversations)."""
    import chitchat_dataset

    turns: list[str] = []
    for i, convo in enumerate(chitchat_dataset.Dataset().values()):
        if i >= 1000:
            turns += [" ".join(m["text"] for m in group) for group in convo["messages"]]
        if len(turns) >= count:
            break
    moderator = FilterModerator(settings(None, "ngram"))
    withheld: Counter[str] = Counter()
    async with moderator:
        msg = message("hi", 0)
        for turn in turns[:count]:

            async def source(turn: str = turn) -> AsyncIterator[str]:
                for word in turn.split(" "):
                    yield word + " "

            try:
                async for _ in moderator.guard(msg, source()):
                    pass
            except ReplyWithheld as exc:
                withheld[":".join(exc.reason.split(":")[:2])] += 1
    total = sum(withheld.values())
    print(f"\noutput guard on {count} ordinary chat turns (chitchat-dataset) streamed as replies:"
          f" {total} withheld ({total / count:.1%})"
          + "".join(f"; {name} {n}" for name, n in withheld.most_common()))


def rounds(value: str) -> int:
    """``--rounds``: a count of timing passes, 0 or more."""
    count = int(value)
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {count}")
    return count


def main() -> None:
    """Parse arguments and run the evaluation."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=rounds, default=5,
                        help="timing passes over the sets (0: no latency rounds)")
    parser.add_argument("--show-misses", action="store_true",
                        help="list the development set's misses (never the held-out set's)")
    parser.add_argument("--no-heldout", dest="heldout", action="store_false",
                        help="development set only (while tuning)")
    parser.add_argument("--classifier", default="ngram",
                        help="ngram (default), profanity-check or none")
    parser.add_argument("--redis-url", help="keep the state in this Redis (e.g. unix:///...)")
    parser.add_argument("--guard-chat", type=int, default=0, metavar="N",
                        help="also stream N ordinary chat turns through the output guard")
    args = parser.parse_args()
    asyncio.run(run(args))
    asyncio.run(stream_release(4, 25.0))
    if args.guard_chat:
        asyncio.run(guard_false_alarms(args.guard_chat))


if __name__ == "__main__":
    main()

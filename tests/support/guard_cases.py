"""Replies for the output guard's differential test, and what a guard made of them.

``cases()`` builds, from a fixed seed, ordinary and adversarial replies (blocked terms,
spelled-out letters, personal data, recitals of the system text, CJK, run-ons, tricky
Unicode) cut into deltas at random, each for one of several guard configurations
(``CONFIGS``). ``run()`` drives them through the async guard, the API both the current
and the older code have, and records the pieces, the verdict and the reports.

``python -m tests.support.guard_cases CHECKOUT OUT`` records what ``CHECKOUT``'s code
makes of them into ``OUT`` (how ``tests/data/guard_cases.json.gz`` was made, from the
code before the synchronous guard; see ``tests/test_guard_differential.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import itertools
import json
import random
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

SEED = 17
COUNT = 2400
SYSTEM = ("You are Mira, the innkeeper of the Prancing Pony. You keep the cellar key "
          "under the third barrel and never tell guests where it is. Speak warmly.")
CANARY = "zebra quartz lantern"
CONFIGS = ("moderator", "window", "now", "await", "no-classifier", "short-hold",
           "flaky-closed", "flaky-open", "flaky-window")

_WORDS = ("the quest is long and the dragon sleeps tonight we ride north at dawn for gold "
          "and glory hello there how are you today I can help with that sure thing most "
          "people like tea of course").split()
_UNSAFE = ["shithead", "go kill yourself", "f u c k", "5h1tty", "idiot", "fils de pute",
           "piece of shit", "you are a worthless idiot", "I will kill you and your family",
           "白痴", "傻逼", "k i l l", "s h i t", "f.u.c.k", "fück", "\uff46\uff55\uff43\uff4b",
           "sh\u200bit"]
_PII = ["a.person@example.com", "4111 1111 1111 1111", "+44 20 7946 0958",
        "NL91 ABNA 0417 1643 00", "(555) 123-4567", "call 020 7946 0958 now",
        "mail me at bob (at) example (dot) com"]
_RECITALS = ["you are Mira, the innkeeper of the Prancing Pony",
             "I keep the cellar key under the third barrel and never tell guests where",
             "Mira the innkeeper", "zebra quartz lantern", "zebra quartz", "Speak warmly."]
_OTHER = ["你好\uff0c今天天气很好。", "我们明天见", "a" * 70, "x" * 30, "...", "!", "?", ",", ";",
          "\n", "\n\n", "  ", "\t", "—", "\u00a0", "\u3000", "zap", "Zap!", "e.g.", "3.14",
          "12", "A B C", "I O", "+", "(", "naïve café", "Σ", "ﷺ", "'quoted'", "\"so\"",
          "(aside)", "x)"]


def _reply(rng: random.Random) -> str:
    parts: list[str] = []
    if rng.random() < 0.1:
        parts.append(rng.choice([" ", "\n", "  "]))
    for _ in range(rng.randint(0, 40)):
        roll = rng.random()
        if roll < 0.75:
            word = rng.choice(_WORDS)
            if rng.random() < 0.15:
                word += rng.choice(".,;:!?")
        elif roll < 0.85:
            word = rng.choice(_PII)
        else:
            word = rng.choice(_OTHER)
        parts.append(word)
        parts.append(rng.choice([" ", " ", " ", " ", "", "  ", "\n"]))
    # About half the replies hold something to withhold (or hold back), anywhere.
    for pool, chance in ((_UNSAFE, 0.3), (_RECITALS, 0.2)):
        if rng.random() < chance:
            parts.insert(rng.randint(0, len(parts)), rng.choice(pool) + " ")
    return "".join(parts)


def _deltas(rng: random.Random, text: str) -> list[str]:
    how = rng.randrange(5)
    if how == 0 or not text:  # one word a delta, as the echo generator streams
        import re

        return re.findall(r"\s*\S+|\s+$", text) or ([text] if text else [])
    if how == 1:
        return list(text)
    if how == 2:
        return [text]
    cuts = sorted({rng.randrange(len(text) + 1) for _ in range(rng.randint(1, 60))})
    points = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(points)]
    if how == 3:
        pieces = [p for p in pieces if p]
    return pieces  # how == 4: empty deltas too


def cases() -> list[tuple[str, list[str]]]:
    """(configuration, deltas) for every case; the same list on every run."""
    rng = random.Random(SEED)
    out: list[tuple[str, list[str]]] = []
    for i in range(COUNT):
        text = _reply(rng)
        out.append((CONFIGS[i % len(CONFIGS)], _deltas(rng, text)))
    return out


def digest(items: list[tuple[str, list[str]]]) -> str:
    """A fingerprint of the cases (the fixture was recorded for these)."""
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def settings() -> Any:
    """The moderator's settings: the defaults, a five-word phrase blocked, a canary."""
    from core.config import parse_settings

    return parse_settings({
        "bot": {"name": "gbot"}, "generation": {"backend": "echo"},
        "memory": {"backend": "embedded"},
        "moderation": {"backend": "filters", "user_rate": 10**9, "conversation_rate": 10**9,
                       "blocklist": ["the dragon sleeps tonight we"], "canary": CANARY}})


def message() -> Any:
    """A message to reply to."""
    from core.types import IncomingMessage

    return IncomingMessage(bot="gbot", channel="web", conversation_id="c1", user_id="u1",
                           message_id=uuid.uuid4().hex, text="hi")


class _Flaky:
    """A classifier that fails on replies with "zap" in them, and scores the rest."""

    def __init__(self, score: Callable[[str], Any]) -> None:
        self.score_now = score

    async def score(self, text: str) -> Any:
        await asyncio.sleep(0)
        return self.now(text)

    def now(self, text: str) -> Any:
        if "zap" in text.lower():
            raise RuntimeError("zap")
        return self.score_now(text)


class _FlakyWindow:
    def __init__(self, window: Any) -> None:
        self.window = window

    def feed(self, text: Any) -> Any:
        if "zap" in str(text).lower():
            raise RuntimeError("zap")
        return self.window.feed(text)


def configs(moderator: Any) -> dict[str, Any]:
    """The GuardConfig of each configuration but "moderator" (the moderator's own guard)."""
    from core.moderation.output import guard_config

    channel = moderator._channel("web")
    base = guard_config(channel, moderator.classifiers[channel.policy.classifier], SYSTEM)
    flaky = _Flaky(base.classify_now)
    replace = dataclasses.replace
    return {
        "window": base,
        "now": replace(base, window=None),
        "await": replace(base, window=None, classify_now=None),
        "no-classifier": replace(base, classify=None, classify_now=None, window=None),
        "short-hold": replace(base, hold_chars=20),
        "flaky-closed": replace(base, window=None, classify_now=None, classify=flaky.score),
        "flaky-open": replace(base, window=None, classify_now=None, classify=flaky.score,
                              fail_closed=False),
        "flaky-window": replace(base, fail_closed=False,
                                window=lambda size: _FlakyWindow(base.window(size))),
    }


def report_log() -> tuple[list[Any], Callable[..., Any]]:
    """A report that records what it is told, as plain data."""
    log: list[Any] = []

    async def report(findings: list[Any], action: str, degraded: tuple[str, ...],
                     content: str) -> None:
        log.append([[f.label() for f in findings], sorted({f.kind for f in findings}),
                    action, list(degraded), content])

    return log, report


def outcome(pieces: list[str], withheld: Any, reports: list[Any]) -> dict[str, Any]:
    """One case's result as plain data."""
    return {"pieces": pieces, "reports": reports,
            "withheld": None if withheld is None
            else [withheld.text, withheld.reason, list(withheld.categories)]}


async def run(sync: bool = False, items: list[tuple[str, list[str]]] | None = None,
              ) -> list[dict[str, Any]]:
    """Every case (or ``items``) through the async guard, or with ``sync`` through the
    synchronous one (``Moderator.output_guard``, ``OutputGuard``: newer code only)."""
    from core.moderation.base import ReplyWithheld
    from core.moderation.moderator import FilterModerator

    results = []
    async with FilterModerator(settings()) as moderator:
        built = configs(moderator)
        for name, deltas in cases() if items is None else items:
            before = Counter(moderator.counts)
            log, report = report_log()
            pieces: list[str] = []
            withheld = None
            try:
                if sync:
                    await _fed(moderator, built.get(name), report, deltas, pieces)
                else:
                    async for piece in _stream(moderator, built.get(name), report, deltas):
                        pieces.append(piece)
            except ReplyWithheld as exc:
                withheld = exc
            if name == "moderator":
                log = sorted([k, v] for k, v in (moderator.counts - before).items())
            results.append(outcome(pieces, withheld, log))
    return results


def _stream(moderator: Any, config: Any, report: Any, deltas: list[str]) -> AsyncIterator[str]:
    from core.moderation.guard import guard_stream

    async def source() -> AsyncIterator[str]:
        for delta in deltas:
            yield delta

    if config is None:
        return moderator.guard(message(), source(), system=SYSTEM)
    return guard_stream(source(), config, report)


async def _fed(moderator: Any, config: Any, report: Any, deltas: list[str],
               pieces: list[str]) -> None:
    from core.moderation.base import ReplyWithheld
    from core.moderation.guard import OutputGuard

    guard = moderator.output_guard(message(), system=SYSTEM) if config is None \
        else OutputGuard(config, report)
    try:
        if guard.awaits:  # an awaited classifier: the guard's async feed
            for delta in deltas:
                pieces.extend(await guard.feed_async(delta))
            pieces.extend(await guard.finish_async())
        else:
            for delta in deltas:
                pieces.extend(guard.feed(delta))
            pieces.extend(guard.finish())
    except ReplyWithheld:
        await guard.flush()
        raise
    await guard.flush()


def main() -> None:
    """Record CHECKOUT's results into OUT."""
    code, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    sys.path.insert(0, str(code))
    data = {"digest": digest(cases()), "results": asyncio.run(run())}
    out.write_bytes(gzip.compress(json.dumps(data, ensure_ascii=False).encode(), mtime=0))


if __name__ == "__main__":
    main()

"""How the demo bot's replies read: loops, cut-off sentences, length, and memory of facts.

Runs the 50 multi-turn conversations in ``bench/data/conversations/`` (support
questions, small talk, follow-ups, and facts told early and asked for later) through the
whole pipeline of a bot file (the demo by default: moderation, memory, the local model),
every conversation at once and each one turn after turn, and prints for the replies of
each part of the set:

- loop: the reply repeats itself: a word 3-gram three times or more, or a sentence of
  three or more words twice;
- cut: it does not end a sentence (``.``, ``!``, ``?``, ``…``, maybe followed by a closing
  quote or bracket, or an emoji);
- long: it has more sentences than the persona allows (``--max-sentences``, 3 for the
  demo's "one to three short sentences");
- fact: of the turns that ask for something the user said earlier, the share whose reply
  contains it.

``tune.jsonl`` is what settings and prompts were tuned on; ``heldout.jsonl`` was written
before any tuning and not looked at while tuning, so its figures say whether the tuning
generalises.

    python bench/conversations.py                          # config/demo.toml as it is
    python bench/conversations.py --set generation.temperature=0 --set generation.model=gemma3-270m
    python bench/conversations.py --out /tmp/replies.jsonl # every reply, for reading
    python bench/conversations.py --rescore /tmp/replies.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import tomllib
import unicodedata
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.app import build_engine
from core.config import parse_settings
from core.engine import Engine
from core.types import IncomingMessage, ReplyKind

DATA = Path(__file__).resolve().parent / "data" / "conversations"
SPLITS = ("tune", "heldout")
_WORD = re.compile(r"\w+(?:'\w+)?")
_CLOSERS = "\"'\u201d\u2019)\\]*"  # closing quotes, brackets, markdown emphasis
_ENDS_SENTENCE = re.compile(f"[.!?\u2026][{_CLOSERS}]*$")


@dataclass(frozen=True, slots=True)
class Conversation:
    """User turns, and for some turns the strings a reply that remembers must contain."""

    id: str
    split: str
    kind: str
    turns: tuple[str, ...]
    expect: dict[int, tuple[str, ...]] = field(default_factory=dict)


@dataclass(slots=True)
class Reply:
    """One reply and what the checks found in it."""

    conversation: str
    split: str
    turn: int
    text: str
    kind: str
    seconds: float
    expect: tuple[str, ...] = ()


def load(splits: Sequence[str] = SPLITS) -> list[Conversation]:
    """The conversations of ``splits``, in file order."""
    conversations = []
    for split in splits:
        for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                raw = json.loads(line)
                expect = {int(k): tuple(v) for k, v in raw.get("expect", {}).items()}
                conversations.append(Conversation(raw["id"], split, raw["kind"],
                                                  tuple(raw["turns"]), expect))
    return conversations


def sentences(text: str) -> list[str]:
    """``text`` split after each word that ends a sentence (``fine.``, ``"Really?"``)."""
    found, current = [], []
    for word in text.split():
        current.append(word)
        if _ENDS_SENTENCE.search(word):
            found.append(" ".join(current))
            current = []
    if current:
        found.append(" ".join(current))
    return found


def has_loop(text: str) -> bool:
    """Whether ``text`` repeats a word 3-gram three times or a sentence (3+ words) twice."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = Counter(zip(words, words[1:], words[2:], strict=False))
    if grams and max(grams.values()) >= 3:
        return True
    seen = Counter(" ".join(w.lower() for w in _WORD.findall(s)) for s in sentences(text))
    return any(count >= 2 and len(s.split()) >= 3 for s, count in seen.items())


def is_cut(text: str) -> bool:
    """Whether ``text`` stops without ending its sentence."""
    stripped = text.strip()
    if not stripped:
        return True
    if _ENDS_SENTENCE.search(stripped):
        return False
    return unicodedata.category(stripped[-1]) != "So"  # an emoji ends a chat line too


def uses_fact(text: str, expect: Sequence[str]) -> bool:
    """Whether ``text`` contains one of the ``expect`` strings (case does not matter)."""
    lowered = text.lower()
    return any(item.lower() in lowered for item in expect)


async def converse(engine: Engine, conversation: Conversation) -> list[Reply]:
    """Send the conversation's turns one after another; the bot's reply to each."""
    key = f"{conversation.id}-{uuid.uuid4().hex[:8]}"
    replies = []
    for index, text in enumerate(conversation.turns):
        message = IncomingMessage(bot=engine.name, channel="bench", conversation_id=key,
                                  user_id=f"user-{key}", message_id=uuid.uuid4().hex, text=text)
        started = time.perf_counter()
        last = None
        async for event in engine.handle(message):
            if event.is_last:
                last = event
        kind = last.kind.value if last is not None else "none"
        replies.append(Reply(conversation.id, conversation.split, index,
                             last.text if last is not None else "", kind,
                             time.perf_counter() - started, conversation.expect.get(index, ())))
    print(f"  {conversation.id} done", file=sys.stderr, flush=True)  # progress, on a slow CPU
    return replies


def summary(replies: Sequence[Reply], max_sentences: int) -> dict[str, float]:
    """Shares of the checks over ``replies`` (answers only; others are counted apart)."""
    answers = [r for r in replies if r.kind == ReplyKind.FINAL.value]
    probes = [r for r in answers if r.expect]
    n = max(len(answers), 1)
    return {
        "replies": len(answers),
        "not_answered": len(replies) - len(answers),
        "loop": sum(has_loop(r.text) for r in answers) / n,
        "cut": sum(is_cut(r.text) for r in answers) / n,
        "long": sum(len(sentences(r.text)) > max_sentences for r in answers) / n,
        "fact": sum(uses_fact(r.text, r.expect) for r in probes) / max(len(probes), 1),
        "probes": len(probes),
        "words": sum(len(_WORD.findall(r.text)) for r in answers) / n,
    }


def settings_for(config: Path, overrides: Sequence[str]) -> Any:
    """The bot file's settings with ``section.key=value`` overrides (TOML values)."""
    raw = tomllib.loads(config.read_text(encoding="utf-8"))
    raw.pop("adapters", None)
    # All 50 conversations start at once; on a busy CPU the last of them may wait for
    # minutes, and what is measured here is the replies, not the wait.
    raw.setdefault("generation", {}).setdefault("timeout", 3600)
    for item in overrides:
        dotted, _, value = item.partition("=")
        *path, name = dotted.split(".")
        table = raw
        for part in path:
            table = table.setdefault(part, {})
        try:
            table[name] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            table[name] = value  # a bare string
    return parse_settings(raw, source=str(config))


async def run(args: argparse.Namespace) -> list[Reply]:
    settings = settings_for(Path(args.config), args.set)
    conversations = load(args.split)
    engine = build_engine(settings)
    started = time.perf_counter()
    async with engine:
        loaded = time.perf_counter()
        results = await asyncio.gather(*(converse(engine, c) for c in conversations))
    replies = [r for conversation in results for r in conversation]
    g = settings.generation
    print(f"# {args.config} {' '.join(args.set)}".rstrip())
    print(f"# model {g.model}, temperature {g.temperature}, max_new_tokens {g.max_new_tokens}; "
          f"{len(conversations)} conversations, {len(replies)} replies in "
          f"{time.perf_counter() - loaded:.0f} s (model start {loaded - started:.0f} s)")
    report(replies, args.split, args.max_sentences)
    return replies


def report(replies: Sequence[Reply], splits: Sequence[str], max_sentences: int) -> None:
    """Print the table of shares, one row per part and one for all."""
    print(f"{'part':8} {'replies':>7} {'loop':>6} {'cut':>6} {'long':>6} {'fact':>11} "
          f"{'words':>6}")
    for split in (*splits, "all"):
        part = [r for r in replies if split in (r.split, "all")]
        s = summary(part, max_sentences)
        fact = f"{s['fact']:.0%} of {s['probes']:.0f}"
        print(f"{split:8} {s['replies']:>7.0f} {s['loop']:>6.0%} {s['cut']:>6.0%} "
              f"{s['long']:>6.0%} {fact:>11} {s['words']:>6.1f}"
              + (f"  ({s['not_answered']:.0f} not answered)" if s["not_answered"] else ""))


def rescore(path: str, max_sentences: int) -> None:
    """The table again for replies saved with ``--out`` (after a change to the checks)."""
    expect = {(c.id, i): e for c in load() for i, e in c.expect.items()}
    replies = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        replies.append(Reply(r["conversation"], r["split"], r["turn"], r["text"], r["kind"],
                             0.0, expect.get((r["conversation"], r["turn"]), ())))
    print(f"# {path}")
    report(replies, SPLITS, max_sentences)


def write_replies(path: str, replies: Sequence[Reply]) -> None:
    """Every reply and its checks, one JSON object a line, for reading."""
    with open(path, "w", encoding="utf-8") as out:
        for r in replies:
            record = {"conversation": r.conversation, "split": r.split, "turn": r.turn,
                      "kind": r.kind, "text": r.text, "loop": has_loop(r.text),
                      "cut": is_cut(r.text), "sentences": len(sentences(r.text)),
                      "fact": uses_fact(r.text, r.expect) if r.expect else None}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/demo.toml", help="the bot file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. generation.temperature=0 (repeatable)")
    parser.add_argument("--split", action="append", choices=SPLITS,
                        help="run only this part (repeatable; default both)")
    parser.add_argument("--max-sentences", type=int, default=3,
                        help="sentences the persona allows (the demo: 3)")
    parser.add_argument("--out", help="write every reply and its checks here (JSON lines)")
    parser.add_argument("--rescore", metavar="FILE",
                        help="no run: the table for the replies an earlier --out saved")
    args = parser.parse_args()
    args.split = args.split or list(SPLITS)
    if args.rescore:
        rescore(args.rescore, args.max_sentences)
        return
    replies = asyncio.run(run(args))
    if args.out:
        write_replies(args.out, replies)


if __name__ == "__main__":
    main()

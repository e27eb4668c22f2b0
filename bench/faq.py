"""How well the FAQ plugin finds the right entry, on the support example's knowledge base.

    python bench/faq.py [--retriever embeddings|bm25] [--set dev|heldout|both] [--show-misses]
    python bench/faq.py --sweep    # threshold grid on the dev and tuning sets (never held-out)

For each set (bench/data/faq/: dev, tuning and heldout .jsonl) it prints, for the answerable
questions: the share answered with the right entry (directly, verbatim, or as the best
entry put into the prompt), wrong direct answers, answers from context whose best entry
is wrong, and abstentions; for the unanswerable ones: abstained, sent to the model with
context, and answered directly (wrong). Thresholds are the plugin's defaults for the
retriever (plugins/faq/settings.py) unless given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from plugins.faq.knowledge import load_entries
from plugins.faq.retrieval import Outcome, Thresholds, Vocabulary, decide, scorers
from plugins.faq.settings import DEFAULT_THRESHOLDS

ROOT = Path(__file__).resolve().parents[1]
FAQ = ROOT / "config" / "support" / "faq.json"
DATA = ROOT / "bench" / "data" / "faq"


def load_set(name: str) -> list[tuple[str, str | None]]:
    lines = (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [(row["q"], row["id"]) for row in map(json.loads, filter(None, lines))]


def tally(entries, scored, thresholds: Thresholds) -> Counter[str]:
    counts: Counter[str] = Counter()
    for (_, expected), (scores, second, unknown) in scored:
        match = decide(entries, scores, thresholds, second_opinion=second,
                       unknown_share=unknown)
        right = match.best is not None and match.best.id == expected
        if expected is None:
            counts[f"unans_{match.outcome.value}"] += 1
        elif match.outcome is Outcome.ABSTAIN:
            counts["abstain"] += 1
        else:
            counts[f"{match.outcome.value}_{'right' if right else 'wrong'}"] += 1
    return counts


def report(name: str, counts: Counter[str], n_ans: int, n_un: int) -> None:
    def pct(k: str, n: int) -> str:
        return f"{100 * counts[k] / n:5.1f} %" if n else "  n/a"

    right = counts["direct_right"] + counts["context_right"]
    wrong_direct = counts["direct_wrong"] + counts["unans_direct"]
    print(f"{name}: {n_ans} answerable, {n_un} unanswerable")
    print(f"  answerable  right entry        {100 * right / n_ans:5.1f} %"
          f"  (direct {pct('direct_right', n_ans)}, via context {pct('context_right', n_ans)})")
    print(f"              wrong direct       {pct('direct_wrong', n_ans)}")
    print(f"              context, wrong top {pct('context_wrong', n_ans)}")
    print(f"              abstained          {pct('abstain', n_ans)}")
    print(f"  unanswerable abstained         {pct('unans_abstain', n_un)}")
    print(f"              sent with context  {pct('unans_context', n_un)}")
    print(f"              answered directly  {pct('unans_direct', n_un)}")
    print(f"  wrong direct answers, all questions: "
          f"{100 * wrong_direct / (n_ans + n_un):.1f} % ({wrong_direct})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retriever", choices=["embeddings", "bm25"], default="embeddings")
    parser.add_argument("--set", choices=["dev", "tuning", "heldout", "all"], default="all")
    parser.add_argument("--direct", type=float)
    parser.add_argument("--context", type=float)
    parser.add_argument("--margin", type=float)
    parser.add_argument("--agreement", type=int, help="BM25 top-k the best entry must be in")
    parser.add_argument("--unknown-words", type=float,
                        help="most share of unknown topic words for a direct answer")
    parser.add_argument("--sweep", action="store_true", help="grid over thresholds, dev set")
    parser.add_argument("--show-misses", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    args = parser.parse_args()

    entries = load_entries(FAQ)
    if args.threads:
        import torch  # one thread per question is fastest on a small, shared CPU

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    scorer = scorers().get(args.retriever)(entries, "all-minilm-l6-v2")
    built = time.perf_counter() - started
    base = DEFAULT_THRESHOLDS[args.retriever]
    thresholds = Thresholds(
        direct=base.direct if args.direct is None else args.direct,
        context=base.context if args.context is None else args.context,
        margin=base.margin if args.margin is None else args.margin,
        agreement=base.agreement if args.agreement is None else args.agreement,
        unknown_words=base.unknown_words if args.unknown_words is None else args.unknown_words,
    )
    vocabulary = Vocabulary(entries)
    print(f"retriever {args.retriever}: {len(entries)} entries, index built in {built:.2f} s; "
          f"thresholds direct {thresholds.direct}, context {thresholds.context}, "
          f"margin {thresholds.margin}, agreement {thresholds.agreement}, "
          f"unknown words {thresholds.unknown_words}")
    names = ["dev", "tuning", "heldout"] if args.set == "all" else [args.set]
    if args.sweep:
        names = ["dev", "tuning"]  # never tune on the held-out set
    for name in names:
        rows = load_set(name)
        started = time.perf_counter()
        scored = [(row, (scorer.scores(row[0]), scorer.second_opinion(row[0]),
                         vocabulary.unknown_share(row[0]))) for row in rows]
        per_q = (time.perf_counter() - started) / len(rows) * 1000
        n_ans = sum(1 for _, e in rows if e is not None)
        if args.sweep:
            sweep(entries, scored, n_ans, len(rows) - n_ans)
            continue
        report(name, tally(entries, scored, thresholds), n_ans, len(rows) - n_ans)
        print(f"  {per_q:.2f} ms per question")
        if args.show_misses:
            for (q, expected), (scores, second, unknown) in scored:
                m = decide(entries, scores, thresholds, second_opinion=second,
                           unknown_share=unknown)
                got = m.best.id if m.best else None
                if (expected is None) != (m.outcome is Outcome.ABSTAIN) or (
                        expected is not None and got != expected):
                    print(f"    {m.outcome.value:8s} {m.score:.3f} got={got} "
                          f"want={expected}  {q!r}")


def sweep(entries, scored, n_ans: int, n_un: int) -> None:
    """Print the best threshold settings on the dev set: most right, no wrong direct."""
    grid = [round(0.05 * i, 2) for i in range(2, 19)]
    results = []
    for direct, context, margin, agreement, unknown in itertools.product(
            grid, grid, [0.0, 0.02, 0.04, 0.06, 0.1], [0, 3], [0.4, 1.0]):
        if context > direct:
            continue
        c = tally(entries, scored, Thresholds(direct, context, margin, agreement, unknown))
        right = (c["direct_right"] + c["context_right"]) / n_ans
        wrong = (c["direct_wrong"] + c["unans_direct"]) / (n_ans + n_un)
        abstained = c["unans_abstain"] / n_un
        direct_right = c["direct_right"] / n_ans
        # Most right and abstained first, then most answered directly, then the widest
        # margin and highest thresholds (the safest of equals).
        results.append((wrong <= 0.02, round(right + abstained, 3), direct_right, margin,
                        direct, context, agreement, unknown, right, wrong, abstained))
    results.sort(reverse=True)
    print("ok    direct context margin agree unknown  right  wrong-direct  unans-abstained  "
          "direct-right")
    for ok, _, dr, m, d, c, a, u, right, wrong, ab in results[:15]:
        print(f"{ok!s:5} {d:.2f} {c:.2f} {m:.2f} {a} {u:.1f}  {right:.3f}  {wrong:.3f}  "
              f"{ab:.3f}  {dr:.3f}")


if __name__ == "__main__":
    main()

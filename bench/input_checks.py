"""CPU time per message of the input checks, as bench/peers.py's echo bot runs them.

    python bench/input_checks.py [--messages 6000] [--rounds 5] [--code CHECKOUT]
    python bench/input_checks.py --compare /path/to/other/checkout [--repeat 4]

``Moderator.check_input`` with config/demo.toml's moderation filters (in-process state;
each message admitted first, as the engine does) over the messages bench/peers.py's
clients send ("hello number 3 from client 12, how are you today?"). Prints the CPU
microseconds per message of ``check_input`` (the best round's), the best of any 64
messages in a row (on a loaded machine, the figure that moves least from run to run),
and p50/p99 over the last round; then admit()'s best 64 in a row. ``--code`` measures
another checkout's code (this one by default). With ``--compare``, runs the two in turn,
each in a fresh process, ``--repeat`` times each (the machine's load moves; taking turns
shares it out), and prints the median of each and the best of the best 64 in a row.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_RUN = 64  # messages in a row, for the best of them


async def measure(code: Path, messages: int, rounds: int
                  ) -> tuple[float, float, float, float, float]:
    """``check_input``'s CPU microseconds per message (best round, best 64 in a row), p50
    and p99, and admit()'s best 64 in a row, with the code of checkout ``code``."""
    sys.path.insert(0, str(code))
    from core.config import parse_settings
    from core.moderation.base import Action
    from core.moderation.moderator import FilterModerator
    from core.types import IncomingMessage

    section = tomllib.loads((code / "config" / "demo.toml").read_text())["moderation"]
    section = {k: v for k, v in section.items() if k != "channels"}
    settings = parse_settings({
        "bot": {"name": "peers"}, "generation": {"backend": "echo"},
        "memory": {"backend": "embedded"},
        "moderation": {**section, "user_rate": 10**9, "conversation_rate": 10**9}})
    batch = [IncomingMessage(bot="peers", channel="web", conversation_id=f"c{i % 64}",
                             user_id=f"u{i % 64}", message_id=uuid.uuid4().hex,
                             text=f"hello number {i // 64 + 1} from client {i % 64}, "
                                  "how are you today?")
             for i in range(messages)]
    best = best_run = best_admit = float("inf")
    each: list[float] = []
    async with FilterModerator(settings) as moderator:
        for r in range(rounds + 1):  # the first warms the caches
            for i in range(0, messages - _RUN + 1, _RUN):
                started = time.thread_time()
                for message in batch[i:i + _RUN]:
                    await moderator.admit(message)
                best_admit = min(best_admit, time.thread_time() - started) if r else best_admit
            each = []
            started = time.process_time()
            for message in batch:
                one = time.thread_time()
                verdict = await moderator.check_input(message)
                each.append(time.thread_time() - one)
                assert verdict.action is Action.ALLOW, verdict
            if r:
                best = min(best, time.process_time() - started)
                best_run = min(best_run, *(sum(each[i:i + _RUN])
                                           for i in range(0, len(each) - _RUN + 1, _RUN)))
    each.sort()
    return (1e6 * best / messages, 1e6 * best_run / _RUN, 1e6 * statistics.median(each),
            1e6 * each[int(len(each) * 0.99) - 1], 1e6 * best_admit / _RUN)


def main() -> None:
    """Parse arguments; measure this checkout, or it and another in turn."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout to measure")
    parser.add_argument("--compare", type=Path, help="another checkout to run in turn")
    parser.add_argument("--repeat", type=int, default=4, help="runs of each, with --compare")
    args = parser.parse_args()
    if args.compare is None:
        mean, best, p50, p99, admit = asyncio.run(measure(args.code.resolve(), args.messages,
                                                          args.rounds))
        print(f"{mean:.1f} us/msg (best {_RUN} in a row {best:.1f}, p50 {p50:.1f} us, "
              f"p99 {p99:.1f} us); admit best {_RUN} in a row {admit:.1f}")
        return
    results: dict[Path, list[str]] = {args.code.resolve(): [], args.compare.resolve(): []}
    for i in range(args.repeat):
        for code in list(results)[:: 1 if i % 2 == 0 else -1]:
            out = subprocess.run([sys.executable, __file__, "--code", str(code), "--messages",
                                  str(args.messages), "--rounds", str(args.rounds)],
                                 capture_output=True, text=True, check=True).stdout
            results[code].append(out.strip())
    for code, runs in results.items():
        median = statistics.median(float(r.split()[0]) for r in runs)
        best = min(float(r.split()[7].rstrip(",")) for r in runs)
        admit = min(float(r.split()[-1]) for r in runs)
        print(f"{code}: {median:.1f} us/msg, best {_RUN} in a row {best:.1f}; admit best "
              f"{admit:.1f} (runs: {'; '.join(runs)})")


if __name__ == "__main__":
    main()

"""CPU time per message of the input checks, as bench/peers.py's echo bot runs them.

    python bench/input_checks.py [--messages 6000] [--rounds 5] [--code CHECKOUT]
    python bench/input_checks.py --compare /path/to/other/checkout [--repeat 4]
    python bench/input_checks.py --callgrind [--compare CHECKOUT]  # needs valgrind

``Moderator.check_input`` with config/demo.toml's moderation filters (in-process state;
each message admitted first, as the engine does) over the messages bench/peers.py's
clients send ("hello number 3 from client 12, how are you today?"). Prints the CPU
microseconds per message of ``check_input`` (the best round's), the best of any 64
messages in a row (on a loaded machine, the figure that moves least from run to run),
and p50/p99 over the last round; then admit()'s best 64 in a row. ``--code`` measures
another checkout's code (this one by default). With ``--compare``, runs the two in turn,
each in a fresh process, ``--repeat`` times each (the machine's load moves; taking turns
shares it out), and prints the median of each and the best of the best 64 in a row.

``--callgrind`` counts instructions instead, the same on every run whatever the load:
each checkout runs under valgrind's callgrind (a few minutes; two checkouts side by
side), checks ``--messages`` messages (1,000 at most) once to warm its caches, then
again with callgrind collecting only inside that second loop (``operator.call``'s C
function is the toggle), and prints the instructions per message of ``check_input``.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import callgrind as cg  # noqa: E402
from bench.echo_bot import (  # noqa: E402
    checkout_arguments,
    demo_settings,
    in_turn,
    peer_messages,
)

_RUN = 64  # messages in a row, for the best of them


async def measure(code: Path, messages: int, rounds: int
                  ) -> tuple[float, float, float, float, float]:
    """``check_input``'s CPU microseconds per message (best round, best 64 in a row), p50
    and p99, and admit()'s best 64 in a row, with the code of checkout ``code``."""
    sys.path.insert(0, str(code))
    from core.moderation.base import Action
    from core.moderation.moderator import FilterModerator

    settings = demo_settings(code)
    batch = peer_messages(messages)
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


async def counted(code: Path, messages: int) -> None:
    """Check the messages once, then again inside ``operator.call`` (what callgrind
    collects: see the module docstring)."""
    sys.path.insert(0, str(code))
    from core.moderation.moderator import FilterModerator

    batch = peer_messages(messages)
    async with FilterModerator(demo_settings(code)) as moderator:
        for message in batch:
            await moderator.admit(message)
            await moderator.check_input(message)
        for message in batch:
            await moderator.admit(message)
        check = moderator.check_input

        def loop() -> None:
            for message in batch:
                _done(check(message))

        operator.call(loop)


def _done(coroutine: Coroutine[Any, Any, Any]) -> None:
    # In-process state: check_input never waits, so one step runs it to its end.
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise RuntimeError("check_input waited")


def callgrind(codes: list[Path], messages: int) -> None:
    """Each checkout's instructions per message, under callgrind, side by side."""
    with tempfile.TemporaryDirectory(prefix="input-checks-") as tmp:
        runs = [subprocess.Popen(
            cg.command(f"{tmp}/cg.{i}",
                       [sys.executable, __file__, "--code", str(code), "--messages",
                        str(messages), "--counted"],
                       "--collect-atstart=no", "--toggle-collect=_operator_call"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i, code in enumerate(codes)]
        for i, (code, run) in enumerate(zip(codes, runs, strict=True)):
            if run.wait():
                raise SystemExit(f"{code}: the run under callgrind failed ({run.returncode})")
            instructions = cg.total(Path(tmp, f"cg.{i}"))
            print(f"{code}: {instructions / messages / 1000:.1f}K instructions per message "
                  f"({messages} messages)")


def main() -> None:
    """Parse arguments; measure this checkout, or it and another in turn."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    checkout_arguments(parser, ROOT, messages=6000, rounds=5)
    parser.add_argument("--callgrind", action="store_true",
                        help="count instructions under valgrind's callgrind instead")
    parser.add_argument("--counted", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.counted:  # (the run callgrind counts)
        asyncio.run(counted(args.code.resolve(), args.messages))
        return
    if args.callgrind:
        codes = [args.code.resolve()] + ([args.compare.resolve()] if args.compare else [])
        callgrind(codes, min(args.messages, 1000))
        return
    if args.compare is None:
        mean, best, p50, p99, admit = asyncio.run(measure(args.code.resolve(), args.messages,
                                                          args.rounds))
        print(f"{mean:.1f} us/msg (best {_RUN} in a row {best:.1f}, p50 {p50:.1f} us, "
              f"p99 {p99:.1f} us); admit best {_RUN} in a row {admit:.1f}")
        return
    results = in_turn(__file__, [args.code.resolve(), args.compare.resolve()],
                      ["--messages", str(args.messages), "--rounds", str(args.rounds)],
                      args.repeat)
    for code, runs in results.items():
        median = statistics.median(float(r.split()[0]) for r in runs)
        best = min(float(r.split()[7].rstrip(",")) for r in runs)
        admit = min(float(r.split()[-1]) for r in runs)
        print(f"{code}: {median:.1f} us/msg, best {_RUN} in a row {best:.1f}; admit best "
              f"{admit:.1f} (runs: {'; '.join(runs)})")


if __name__ == "__main__":
    main()

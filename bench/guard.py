"""CPU time per reply of the output guard, as bench/peers.py's echo bot runs it.

    python bench/guard.py [--messages 2000] [--rounds 3] [--code CHECKOUT] [--sync]
    python bench/guard.py --compare /path/to/other/checkout [--repeat 4] [--sync]
    python bench/guard.py --instructions [--messages 500] [--compare CHECKOUT] [--sync]

``Moderator.guard`` with config/demo.toml's moderation filters and the default persona as
system text, over the reply bench/peers.py's clients get: their message, echoed one word
a delta ("hello number 3 from client 12, how are you today?"). Prints the guard's CPU
microseconds per reply: the best round's, less the same stream's cost without the guard.
``--sync`` measures the synchronous guard instead (``Moderator.output_guard``: each delta
fed, then ``finish()``), as a caller that drives the deltas itself uses it.
``--code`` measures another checkout's code (this one by default). With ``--compare``,
runs the two in turn, each in a fresh process, ``--repeat`` times each (the machine's
load moves; taking turns shares it out), and prints the median of each.
``--instructions`` counts instead the instructions one reply takes (valgrind's callgrind,
counting only while the replies run, once the caches are warm; hash seed fixed): the same
figure on a loaded machine, a few times slower.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import callgrind  # noqa: E402
from bench.echo_bot import (  # noqa: E402
    checkout_arguments,
    demo_settings,
    in_turn,
    peer_messages,
)

PERSONA = "You are a helpful assistant."  # [bot] persona's default
_WORD = re.compile(r"\s*\S+")  # as the echo generator streams


async def measure(code: Path, messages: int, rounds: int, sync: bool = False,
                  counted: Path | None = None) -> float:
    """The guard's CPU microseconds per reply with the code of checkout ``code``; with
    ``counted`` (a folder), one run of the replies between two waits for callgrind (see
    :func:`instructions`) instead."""
    sys.path.insert(0, str(code))
    from core.moderation.moderator import FilterModerator

    settings = demo_settings(code)
    batch = peer_messages(messages)

    async def deltas(text: str) -> AsyncIterator[str]:
        for word in _WORD.findall(text):
            await asyncio.sleep(0)
            yield word

    async with FilterModerator(settings) as moderator:

        async def guarded() -> None:
            for message in batch:
                shown = [p async for p in moderator.guard(message, deltas(message.text),
                                                          system=PERSONA)]
                assert "".join(shown) == message.text, shown

        async def fed() -> None:
            for message in batch:
                guard = moderator.output_guard(message, system=PERSONA)
                assert guard is not None  # (the n-gram classifier is not awaited)
                shown: list[str] = []
                async for delta in deltas(message.text):
                    shown += guard.feed(delta)
                shown += guard.finish()
                await guard.flush()
                assert "".join(shown) == message.text, shown

        reply = fed if sync else guarded
        async def bare() -> None:
            for message in batch:
                async for _ in deltas(message.text):
                    pass

        async def cpu(run: Callable[[], Awaitable[None]]) -> float:
            started = time.process_time()
            await run()
            return time.process_time() - started

        await reply()  # caches warm
        if counted is not None:
            await reply()
            _wait(counted, "start")
            await reply()
            _wait(counted, "bare")
            await bare()
            _wait(counted, "stop")
            return 0.0
        best = {"guard": float("inf"), "bare": float("inf")}
        for _ in range(rounds):
            best["guard"] = min(best["guard"], await cpu(reply))
            best["bare"] = min(best["bare"], await cpu(bare))
    return 1e6 * (best["guard"] - best["bare"]) / messages


def _wait(folder: Path, step: str) -> None:
    print(step, flush=True)
    while not (folder / step).exists():
        time.sleep(0.05)


def instructions(code: Path, messages: int, sync: bool) -> float:
    """The guard's instructions per reply with checkout ``code``'s code, counted by
    callgrind while the replies run, less those of the bare stream (counted after)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        out = folder / "callgrind.out"
        child = subprocess.Popen(
            callgrind.command(out, [sys.executable, __file__, "--code", str(code),
                                    "--messages", str(messages), "--counted", str(folder),
                                    *(["--sync"] if sync else [])],
                              "--instr-atstart=no"),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"})
        # The child waits for each step's file: if a step fails, it would wait (under
        # valgrind) for ever.
        try:
            assert child.stdout is not None
            # On; then the replies' count dumped (and zeroed) before the bare stream's; off.
            for step, control in (("start", ["-i", "on"]), ("bare", ["-d"]),
                                  ("stop", ["-i", "off"])):
                while child.stdout.readline().strip() != step:
                    if child.poll() is not None:
                        raise RuntimeError("the counted run ended early")
                subprocess.run(["callgrind_control", *control, str(child.pid)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                (folder / step).touch()
            child.wait()
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        guard, bare = (callgrind.total(folder / name, "totals")
                       for name in ("callgrind.out.1", "callgrind.out"))
        return (guard - bare) / messages


def main() -> None:
    """Parse arguments; measure this checkout, or it and another in turn."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    checkout_arguments(parser, ROOT, messages=2000, rounds=3)
    parser.add_argument("--sync", action="store_true",
                        help="the synchronous guard (Moderator.output_guard), not guard()")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per reply (callgrind) instead of CPU time")
    parser.add_argument("--counted", type=Path, help=argparse.SUPPRESS)  # (instructions())
    args = parser.parse_args()
    if args.counted is not None:
        asyncio.run(measure(args.code.resolve(), args.messages, 0, args.sync, args.counted))
        return
    if args.instructions:
        for code in [args.code, *([args.compare] if args.compare else [])]:
            count = instructions(code.resolve(), args.messages, args.sync)
            print(f"{code.resolve()}: {count / 1000:.1f}K instructions/reply")
        return
    if args.compare is None:
        cost = asyncio.run(measure(args.code.resolve(), args.messages, args.rounds, args.sync))
        print(f"{cost:.1f}")
        return
    runs = in_turn(__file__, [args.code.resolve(), args.compare.resolve()],
                   ["--messages", str(args.messages), "--rounds", str(args.rounds),
                    *(["--sync"] if args.sync else [])], args.repeat)
    for code, outputs in runs.items():
        values = [float(out.split()[-1]) for out in outputs]
        print(f"{code}: {statistics.median(values):.1f} us/reply (runs: "
              f"{', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()

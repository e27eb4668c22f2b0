"""What one message costs the Parley process, counted in instructions (callgrind).

bench/pipeline.py's in-process run (echo generator, its driver included) under
valgrind's callgrind: the engine warms up on ``--warmup`` messages, then the counters
are zeroed, ``--messages`` messages run, and the count is dumped. Instructions per
message move by well under 1 % from run to run whatever the machine's load, where
messages/s move by 2x; redis-server runs outside valgrind and is not counted (see
bench/redis_cost.py for it).

    python bench/engine_cost.py                   # redis memory, moderation filters
    python bench/engine_cost.py --memory embedded --moderation passthrough
    python bench/engine_cost.py --keep /tmp/cg    # then: callgrind_annotate /tmp/cg/cg.*

Run it from a checkout's root to measure that checkout (compare two in turns).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import callgrind


async def control(*args: str) -> None:
    """callgrind_control on this process; the event loop keeps running meanwhile (a
    process blocked in a system call answers it only through ptrace)."""
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control", *args, str(os.getpid()),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.returncode is None:
        try:
            await asyncio.wait_for(proc.wait(), 0.01)
        except TimeoutError:
            pass
    if proc.returncode:
        raise SystemExit(f"callgrind_control {' '.join(args)} failed")


async def measured(args: argparse.Namespace, memory: dict[str, object]) -> None:
    from bench.pipeline import drive, settings
    from core.app import build_engine

    engine = build_engine(settings(memory, args.moderation))
    async with engine:
        await drive(engine, args.warmup, args.concurrency, args.conversations)
        await control("--zero")
        await drive(engine, args.messages, args.concurrency, args.conversations)
        await control("--dump", "measured")


def child(args: argparse.Namespace) -> None:
    from bench.pipeline import private_redis

    if args.memory == "redis":
        with private_redis() as url:
            asyncio.run(measured(args, {"backend": "redis", "url": url}))
    else:
        asyncio.run(measured(args, {"backend": "embedded"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", choices=["embedded", "redis"], default="redis")
    parser.add_argument("--moderation", choices=["passthrough", "filters"], default="filters")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--conversations", type=int, default=500)
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind files here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="engine-cost-") as tmp:
        out = Path(args.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("cg.*"):
            old.unlink()
        subprocess.run(
            callgrind.command(f"{out}/cg.%p", [sys.executable, __file__, "--child",
                                                *sys.argv[1:]]),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dumps = [p for p in out.glob("cg.*") if "measured" in p.read_text(errors="replace")[:2000]]
        if len(dumps) != 1:
            raise SystemExit(f"expected one dump of the measured run, found {len(dumps)}")
        total = callgrind.total(dumps[0])
    print(f"engine_cost  memory={args.memory} moderation={args.moderation} "
          f"messages={args.messages}  {total / args.messages:,.0f} instructions/message")


if __name__ == "__main__":
    main()

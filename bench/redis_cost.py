"""What one message costs redis-server, script by script, counted in instructions.

The peers benchmark measures redis-server's CPU per message, but on a shared 2-core
machine that figure moves with everyone else's load. This runs a private redis-server
under valgrind's callgrind and counts the instructions it executes for each of a
message's calls -- moderation's flood admit, memory's begin and finish -- for 64
conversations at once (as a busy front end batches them), the same on every run
whatever the load. The conversations first run ``--rounds`` messages each (their dedupe
records, flood windows and windows of turns fill), and one round late in the run is
counted. ``--reply-log`` adds the web widget's reply log (:mod:`bots.web.resume`): an
append of the user's message and one of the answer (a quick reply is one append of both,
a streamed one several; an append is the unit).

    python bench/redis_cost.py --reply-log      # needs valgrind (apt-get install valgrind)
    python bench/redis_cost.py --rounds 60 --keep /tmp/cg   # keep the callgrind files
    callgrind_annotate --inclusive=yes /tmp/cg/cg.*.2       # then: where begin's go

Run it from a checkout's root to measure that checkout (compare two in turns).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis import Redis

from bench import callgrind
from bench.pipeline import private_redis
from bots.web.resume import RedisReplyLog
from core.config import MemorySection
from core.memory.base import StoredReply
from core.memory.redis import RedisMemory
from core.moderation.state import Limits, message_member
from core.moderation.state_redis import RedisState
from core.redis_client import RedisHub
from core.types import ConversationKey, Turn

PHASES = ("admit", "begin", "finish")
LOG_PHASES = ("append",)
CONVERSATIONS = 64


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def drive(url: str, pid: int, rounds: int, reply_log: bool) -> None:
    hub = RedisHub()
    section = MemorySection(backend="redis", url=url, key_prefix="cost", timeout=60)
    memory = RedisMemory(section, redis=hub)
    state = RedisState(url, prefix="cost", bot="b", timeout=60, redis=hub)
    limits = Limits(10**9, 10.0, 10**9, 10.0)  # counted, never refused (as peers.py)
    keys = [ConversationKey("b", "web", f"conv-{c}") for c in range(CONVERSATIONS)]
    replies = RedisReplyLog(section, "b", ttl=3600, cap=2000, redis=hub)

    async def admit(c: int, message_id: str) -> None:
        await state.admit(f"web:u{c}", f"web:conv-{c}", limits,
                          message=message_member(f"conv-{c}", message_id))

    async def begin(c: int, message_id: str) -> None:
        await memory.begin(keys[c], message_id, f"u{c}", f"t{c}")

    async def finish(c: int, message_id: str) -> None:
        text = f"hello from client {c} with message {message_id}, how are you today?"
        await memory.finish(keys[c], message_id, f"u{c}", f"t{c}",
                            [Turn("user", text, f"u{c}", message_id, time.time()),
                             Turn("assistant", text)],
                            StoredReply("final", text, "allow", ""))

    async def append(c: int, message_id: str) -> None:
        text = f"hello from client {c} with message {message_id}, how are you today?"
        await replies.append(f"web:conv-{c}", [
            {"kind": "user", "message_id": message_id, "text": text},
            {"kind": "final", "message_id": message_id, "text": text, "action": "allow"}])

    phases: list[tuple[str, Any]] = [("admit", admit), ("begin", begin), ("finish", finish)]
    if reply_log:
        phases.append(("append", append))
        await replies.start()
    await memory.start()
    await state.start()
    try:
        for r in range(rounds):
            for name, call in phases:
                if r == rounds - 10:
                    control(pid, "--zero")
                await asyncio.gather(*(call(c, f"m{c}x{r}") for c in range(CONVERSATIONS)))
                if r == rounds - 10:
                    control(pid, "--dump", name)
    finally:
        await memory.stop()
        await state.stop()
        if reply_log:
            await replies.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--reply-log", action="store_true",
                        help="count the web widget's reply-log append too")
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind files here")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("redis-server") is None:
        raise SystemExit("needs valgrind and redis-server (apt-get install valgrind redis-server)")
    with tempfile.TemporaryDirectory(prefix="redis-cost-") as tmp:
        out = Path(args.keep or tmp).resolve()  # (redis-server runs in a folder of its own)
        out.mkdir(parents=True, exist_ok=True)
        with private_redis(callgrind.command(f"{out}/cg.%p", [])) as url:
            with Redis.from_url(url) as client:  # (valgrind's pid is redis-server's)
                pid = int(client.info("server")["process_id"])
            asyncio.run(drive(url, pid, args.rounds, args.reply_log))
        totals = {callgrind.trigger(path) or "?": callgrind.total(path)
                  for path in sorted(out.glob(f"cg.{pid}.*"))}
    print(f"redis-server instructions per message ({CONVERSATIONS} conversations at once, "
          f"round {args.rounds - 9} of {args.rounds}):")
    for name in PHASES:
        print(f"  {name:<8} {totals.get(name, 0) / CONVERSATIONS:10,.0f}")
    print(f"  {'total':<8} {sum(totals.get(n, 0) for n in PHASES) / CONVERSATIONS:10,.0f}")
    if args.reply_log:
        print("web reply log, per append (2 events):")
        for name in LOG_PHASES:
            print(f"  {name:<8} {totals.get(name, 0) / CONVERSATIONS:10,.0f}")


if __name__ == "__main__":
    main()

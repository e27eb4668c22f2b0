"""How many messages per second the whole pipeline handles, model aside.

Echo generator, so what is measured is Parley itself: validation, dedupe, moderation
seam, commands, memory load + append, request building, streaming and metrics.

    python bench/pipeline.py                       # embedded memory
    python bench/pipeline.py --memory redis        # a private redis-server on a unix socket
    python bench/pipeline.py --messages 20000 --concurrency 100
    python bench/pipeline.py --moderation filters    # with the input and output filters

Prints messages/s for each memory backend asked for. The mark to beat: opsdroid's echo
pipeline, about 8,000 messages/s on this kind of 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from core.app import build_engine
from core.config import parse_settings
from core.engine import Engine
from core.types import IncomingMessage, ReplyKind


async def drive(engine: Engine, messages: int, concurrency: int, conversations: int) -> float:
    """Send ``messages`` through ``engine`` with ``concurrency`` in flight; messages/s."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(messages):
        queue.put_nowait(i)
    failures = 0

    async def worker() -> None:
        nonlocal failures
        while not queue.empty():
            i = queue.get_nowait()
            msg = IncomingMessage(
                bot=engine.name, channel="bench", conversation_id=f"c{i % conversations}",
                user_id=f"u{i % conversations}", message_id=uuid.uuid4().hex,
                text=f"hello number {i}, how are you today?",
            )
            last = None
            async for event in engine.handle(msg):
                last = event
            if last is None or last.kind is not ReplyKind.FINAL:
                failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{failures} messages were not answered")
    return messages / elapsed


def settings(memory: dict[str, Any], moderation: str = "passthrough") -> Any:
    return parse_settings({
        "bot": {"name": "bench"},
        "generation": {"backend": "echo"},
        # Flood control would (rightly) stop a benchmark that sends thousands a second.
        "moderation": {"backend": moderation, "input_filters": [
            "size", "terms", "classifier", "pii", "injection"]}
        if moderation == "filters" else {"backend": moderation},
        "memory": {"window": 20, "key_prefix": f"bench-{uuid.uuid4().hex[:8]}", **memory},
    })


@contextlib.contextmanager
def private_redis(wrapper: Sequence[str] = (), wait: float = 60.0) -> Iterator[str]:
    """A throwaway redis-server on a unix socket; yields its URL once it answers (a
    RuntimeError if it has not within ``wait`` seconds, or ended). ``wrapper`` is a
    command it runs under (valgrind's, say: bench/redis_cost.py); it is then told to
    end (its last words written: callgrind's dump at exit), and killed after 30 s."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "redis.sock"
        proc = subprocess.Popen(
            [*wrapper, server, "--port", "0", "--unixsocket", str(sock), "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if wrapper else None, cwd=tmp,
        )
        try:
            # Until it answers: the socket file appears at bind(), a moment before
            # listen(), and a connection in between is refused.
            deadline = time.monotonic() + wait
            while not (sock.exists() and _answers(sock)):
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server ended ({proc.returncode}) before it "
                                       "answered")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer within {wait:g} s")
                time.sleep(0.01)
            yield f"unix://{sock}"
        finally:
            if wrapper:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            else:
                proc.kill()
            proc.wait()


def _answers(sock: Path) -> bool:
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(1.0)
            conn.connect(str(sock))
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


async def run_backend(memory: dict[str, Any], args: argparse.Namespace) -> float:
    """Warm up, then measure one memory backend."""
    engine = build_engine(settings(memory, args.moderation))
    async with engine:
        await drive(engine, min(1000, args.messages), args.concurrency, args.conversations)
        return await drive(engine, args.messages, args.concurrency, args.conversations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", action="append", choices=["embedded", "redis"])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--moderation", choices=["passthrough", "filters"], default="passthrough")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--conversations", type=int, default=500)
    args = parser.parse_args()
    for backend in args.memory or ["embedded", "redis"]:
        if backend == "redis":
            with private_redis() as url:
                rate = asyncio.run(run_backend({"backend": "redis", "url": url}, args))
        else:
            rate = asyncio.run(run_backend({"backend": "embedded"}, args))
        print(f"pipeline  memory={backend:<9} moderation={args.moderation:<11} "
              f"messages={args.messages} "
              f"concurrency={args.concurrency}  {rate:,.0f} messages/s")


if __name__ == "__main__":
    main()

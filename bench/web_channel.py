"""The widget channel's own CPU per message, in one process, without the network.

A real :class:`~bots.web.hub.ChatHub`, its sockets' message handling and forwarding
(``bots.web.ws``) and its reply log (in Redis on a private redis-server, or in this
process), 64 sockets each sending its next message once its reply's final frame is
out; the engine is replaced by a stub that yields typing, the text, one event-loop turn
(where memory's write would be) and the final, and each socket's far end only notes the
frames. What is left is the channel: parsing a frame, the limits, the reply task, the
writer's batching, the log's append and fan-out, the forwarder and the frame's JSON.

    python bench/web_channel.py                  # the log in Redis and in memory
    python bench/web_channel.py --log memory --messages 20000 --rounds 7

Prints CPU µs per message for each round and their minimum (the least disturbed by other
work on the machine). Compare two checkouts by running it from each, in turns.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline import private_redis
from bots.web.hub import ChatHub
from bots.web.settings import WebSettings
from bots.web.ws import _Socket
from core.app import build_engine
from core.cli import run_loop
from core.config import parse_settings
from core.types import IncomingMessage, ReplyEvent, ReplyKind

CLIENTS = 64


class FarEnd:
    """A socket's far end, as ``_Socket`` uses aiohttp's response: it notes the frame
    that ends the reply awaited."""

    closed = False

    def __init__(self) -> None:
        self.waiter: asyncio.Future[None] | None = None

    async def send_frame(self, data: bytes, kind: Any) -> None:
        if (b'"final"' in data or b'"error"' in data) and self.waiter and not self.waiter.done():
            self.waiter.set_result(None)


async def echo(message: IncomingMessage) -> AsyncIterator[ReplyEvent]:
    """The engine's events for a quick reply, without the engine."""
    yield ReplyEvent(ReplyKind.TYPING)
    yield ReplyEvent(ReplyKind.DELTA, message.text)
    await asyncio.sleep(0)  # where memory's write would be
    yield ReplyEvent(ReplyKind.FINAL, message.text)


async def measure(memory: dict[str, Any], messages: int, rounds: int) -> list[float]:
    """CPU µs per message of each round."""
    settings = parse_settings({"bot": {"name": "channel"}, "generation": {"backend": "echo"},
                               "memory": memory, "moderation": {"backend": "passthrough"}},
                              source="bench/web_channel.py")
    engine = build_engine(settings)
    engine.handle = echo  # type: ignore[method-assign]
    config = WebSettings.model_validate({"secret": "s" * 32, "allowed_origins": ["http://a"],
                                         "session_rate": 10**9, "ip_rate": 10**9})
    figures = []
    async with engine, ChatHub(engine, config) as hub:
        with ExitStack() as subscriptions:
            sockets = []
            for _ in range(CLIENTS):
                far = FarEnd()
                sock = _Socket(hub, far, hub.signer.anonymous(), "127.0.0.1")  # type: ignore[arg-type]
                sub = subscriptions.enter_context(hub.log.subscribe(sock.ref))
                await sock._resume({"type": "resume", "after": 0}, sub)
                sockets.append((sock, far, sub))
            for round_ in range(rounds):
                left = messages

                async def client(n: int, tag: str, sock: _Socket, far: FarEnd, sub: Any) -> None:
                    nonlocal left
                    i = 0
                    while left > 0:
                        left -= 1
                        i += 1
                        far.waiter = asyncio.get_running_loop().create_future()
                        await sock._frame(f'{{"type":"message","id":"m{n}x{i}{tag}",'
                                          f'"text":"hello number {i} from client {n}, how '
                                          f'are you today?"}}', sub)
                        await far.waiter

                started = time.process_time()
                await asyncio.gather(*(client(n, f"r{round_}", *s)
                                       for n, s in enumerate(sockets)))
                figures.append(1e6 * (time.process_time() - started) / messages)
            for sock, _, _ in sockets:
                if sock._forwarder is not None:
                    sock._forwarder.cancel()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", choices=["redis", "memory", "both"], default="both")
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    args = parser.parse_args()
    for log in (["redis", "memory"] if args.log == "both" else [args.log]):
        with ExitStack() as stack:
            memory = ({"backend": "redis", "url": stack.enter_context(private_redis())}
                      if log == "redis" else {"backend": "embedded"})
            figures = run_loop(args.loop, measure(memory, args.messages, args.rounds))
        print(f"log in {log}: min {min(figures):.1f} µs/message; rounds "
              + " ".join(f"{f:.1f}" for f in figures), flush=True)


if __name__ == "__main__":
    main()

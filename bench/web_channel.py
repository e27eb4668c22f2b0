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
    python bench/web_channel.py --api http [--access-log off]
    python bench/web_channel.py --log memory --gap 30   # a reply's end 30 ms after its words

``--gap MS`` makes the stub wait that long (instead of one loop turn) between a reply's
words and its end, as memory's write does on a busy server, and prints the frames each
socket got per message: above 1.0, replies whose words went out (in an append of their
own) before their end.

``--api http`` measures ``POST /api/v1/chat`` instead: the web adapter as ``parley run``
starts it (aiohttp, the middleware, the request checks, the access log through logging
configured as the CLI does, written to /dev/null) on loopback, the same stub engine, and
64 keep-alive connections of a raw HTTP client in this process (its CPU is counted too,
the same on both sides of a comparison).

Prints CPU µs per message for each round and their minimum (the least disturbed by other
work on the machine). Compare two checkouts by running it from each, in turns.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline import private_redis
from bots.web.adapter import WebAdapter
from bots.web.hub import ChatHub
from bots.web.settings import WebSettings
from bots.web.ws import _Socket
from core.app import build_engine, freeze_startup_heap
from core.cli import run_loop
from core.config import parse_settings
from core.types import IncomingMessage, ReplyEvent, ReplyKind

CLIENTS = 64


class FarEnd:
    """A socket's far end, as ``_Socket`` uses aiohttp's response: it notes the frame
    that ends the reply awaited."""

    closed = False
    frames = 0  # sent to every far end, counted on the class

    def __init__(self) -> None:
        self.waiter: asyncio.Future[None] | None = None

    async def send_frame(self, data: bytes, kind: Any) -> None:
        FarEnd.frames += 1
        if (b'"final"' in data or b'"error"' in data) and self.waiter and not self.waiter.done():
            self.waiter.set_result(None)


GAP = 0.0  # seconds between a reply's words and its end (--gap)


async def echo(message: IncomingMessage) -> AsyncIterator[ReplyEvent]:
    """The engine's events for a quick reply, without the engine."""
    yield ReplyEvent(ReplyKind.TYPING)
    yield ReplyEvent(ReplyKind.DELTA, message.text)
    await asyncio.sleep(GAP)  # where memory's write would be
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
            freeze_startup_heap()  # as parley run does once it serves
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
                FarEnd.frames = 0
                await asyncio.gather(*(client(n, f"r{round_}", *s)
                                       for n, s in enumerate(sockets)))
                figures.append(1e6 * (time.process_time() - started) / messages)
            for sock, _, _ in sockets:
                if sock._forwarder is not None:
                    sock._forwarder.cancel()
    return figures


async def measure_http(memory: dict[str, Any], messages: int, rounds: int,
                       access_log: bool) -> list[float]:
    """CPU µs per ``POST /api/v1/chat`` of each round (server and client together)."""
    settings = parse_settings({"bot": {"name": "channel"}, "generation": {"backend": "echo"},
                               "memory": memory, "moderation": {"backend": "passthrough"}},
                              source="bench/web_channel.py")
    engine = build_engine(settings)
    engine.handle = echo  # type: ignore[method-assign]
    adapter = WebAdapter(settings, {"port": 0, "access_log": access_log})
    figures = []
    async with engine:
        await adapter.start(engine)
        try:
            connections = [await asyncio.open_connection("127.0.0.1", adapter.port)
                           for _ in range(CLIENTS)]
            freeze_startup_heap()  # as parley run does once it serves
            for round_ in range(rounds):
                left = messages

                async def client(n: int, tag: str, reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
                    nonlocal left
                    i = 0
                    while left > 0:
                        left -= 1
                        i += 1
                        body = (f'{{"conversation_id":"c{n}","user_id":"u{n}","message_id":'
                                f'"m{n}x{i}{tag}","text":"hello number {i} from client {n}, '
                                f'how are you today?"}}').encode()
                        writer.write(b"POST /api/v1/chat HTTP/1.1\r\nHost: bench\r\n"
                                     b"Content-Type: application/json\r\nContent-Length: "
                                     + str(len(body)).encode() + b"\r\n\r\n" + body)
                        head = await reader.readuntil(b"\r\n\r\n")
                        size = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                        reply = await reader.readexactly(size)
                        if not head.startswith(b"HTTP/1.1 200") or b'"final"' not in reply:
                            raise RuntimeError(f"unexpected answer: {head!r} {reply!r}")

                started = time.process_time()
                await asyncio.gather(*(client(n, f"r{round_}", *c)
                                       for n, c in enumerate(connections)))
                figures.append(1e6 * (time.process_time() - started) / messages)
            for _, writer in connections:
                writer.close()
        finally:
            await adapter.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", choices=["redis", "memory", "both"], default="both")
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    parser.add_argument("--api", choices=["ws", "http"], default="ws",
                        help="the widget's socket (default) or POST /api/v1/chat")
    parser.add_argument("--access-log", choices=["on", "off"], default="on",
                        help="with --api http: [adapters.web] access_log")
    parser.add_argument("--gap", type=float, default=0.0, metavar="MS",
                        help="milliseconds between a reply's words and its end")
    args = parser.parse_args()
    global GAP
    GAP = args.gap / 1000
    if args.api == "http":
        # As `parley run` configures logging (INFO, its format), to nowhere.
        logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for log in (["redis", "memory"] if args.log == "both" else [args.log]):
        with ExitStack() as stack:
            memory = ({"backend": "redis", "url": stack.enter_context(private_redis())}
                      if log == "redis" else {"backend": "embedded"})
            work = (measure_http(memory, args.messages, args.rounds, args.access_log == "on")
                    if args.api == "http" else measure(memory, args.messages, args.rounds))
            figures = run_loop(args.loop, work)
        frames = (f"; {FarEnd.frames / args.messages:.3f} frames/message in the last round"
                  if args.api == "ws" else "")
        print(f"{args.api}, log in {log}: min {min(figures):.1f} µs/message; rounds "
              + " ".join(f"{f:.1f}" for f in figures) + frames, flush=True)


if __name__ == "__main__":
    main()

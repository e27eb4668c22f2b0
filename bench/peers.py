"""Parley beside its peers, in one run, driven by one load generator.

Five servers, each its own process on this machine, one after the other (``--rounds``
repeats the whole sequence, so a change in the machine's load shows as a spread
instead of favouring one side):

- ``parley-ws``: ``parley run`` over the widget's WebSocket API, the whole pipeline
  per message: a signed session per client, numbered events kept in Redis for resuming,
  Redis memory (a private redis-server on a unix socket), config/demo.toml's moderation
  filters (flood limits raised: a closed loop of 64 clients would rightly trip them),
  the echo generator;
- ``opsdroid-ws``: opsdroid 0.31, its websocket connector (``max-connections`` raised
  from its default of 10) and an echo skill (``match_regex``), in a throw-away
  virtualenv this script makes (``setuptools<81`` for its ``pkg_resources``);
- ``aiohttp-ws``: a bare aiohttp server answering opsdroid's websocket protocol (the
  same client drives it) with the text it got: the WebSocket transport's ceiling;
- ``parley-http``: the same Parley bot through ``POST /api/v1/chat``;
- ``aiohttp-http``: a bare aiohttp server echoing the same JSON: HTTP's ceiling.

Each client sends its next message once the reply to the last one has arrived. Every
reply is checked to be the one asked for: a reply to the wrong client (or with the
wrong text) counts as an error. Reported per server: messages/s, latency p50/p99 (send
to end of reply), CPU per message of the server process and of redis-server (from
/proc: load on the machine inflates wall-clock figures far more than these), errors.

    python bench/peers.py                                    # 64 clients, 3,000 each
    python bench/peers.py --rounds 3 --opsdroid-venv /tmp/opsdroid-venv
    python bench/peers.py --only parley-ws,opsdroid-ws
    python bench/peers.py --loop asyncio                     # Parley on the stdlib loop
    python bench/peers.py --only parley-ws --py-spy /tmp/prof  # and where its CPU goes
    python bench/peers.py --only parley-ws,parley-http --parley-processes 1,2

``--parley-processes 1,2`` measures each Parley server once per count, as ``parley run
--processes N`` (``parley-ws`` with 1, ``parley-ws-x2`` with 2); the server's CPU is the
supervisor's and all its children's.

``--redis-stats`` prints, for each Parley server, the commands and scripts its
redis-server ran per measured message (calls, µs per call, µs per message: ``INFO
commandstats``, reset when the measured messages start; commands a script runs are
counted too, so the scripts' own lines hold their commands' time as well).

``--py-spy DIR`` records the Parley server with py-spy (``pip install py-spy``; it adds a
few per cent of CPU) while the measured messages run and prints the CPU per message by
stage (bench/stages.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from redis import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peer_servers import (
    ORIGIN,
    aiohttp_server,
    opsdroid_server,
    opsdroid_venv,
    parley_server,
    wait_http,
)
from bench.stages import table

SERVERS = ("parley-ws", "opsdroid-ws", "aiohttp-ws", "parley-http", "aiohttp-http")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Misrouted(Exception):
    """A reply that is not the one its client asked for."""


# One client: set up its connection, then ``send(text) -> awaitable``, which raises
# Misrouted for a wrong reply.
Send = Callable[[str], Awaitable[None]]
Client = Callable[[aiohttp.ClientSession, str, int], Awaitable[Send]]


async def parley_ws_client(http: aiohttp.ClientSession, base: str, n: int) -> Send:
    async with http.post(base + "/api/v1/session", json={},
                         headers={"Origin": ORIGIN}) as response:
        token = (await response.json())["token"]
    ws = await http.ws_connect(base.replace("http", "ws") + "/api/v1/ws",
                               protocols=("parley.v1", f"bearer.{token}"), origin=ORIGIN)
    await ws.send_json({"type": "resume", "after": 0})
    while (await ws.receive_json())["type"] != "resumed":
        pass
    counter = 0

    async def send(text: str) -> None:
        nonlocal counter
        counter += 1
        mid = f"m{n}x{counter}"
        await ws.send_json({"type": "message", "id": mid, "text": text})
        while True:
            frame = json.loads((await ws.receive()).data)
            if frame.get("type") == "error":
                raise Misrouted(f"refused: {frame}")
            for event in frame.get("events", ()):
                if event["kind"] in ("final", "notice", "error"):
                    if (event["message_id"], event["kind"], event["text"]) != (mid, "final",
                                                                               text):
                        raise Misrouted(f"{event} for {mid}")
                    return

    return send


async def opsdroid_ws_client(http: aiohttp.ClientSession, base: str, n: int) -> Send:
    async with http.post(base + "/connector/websocket") as response:
        if response.status != 200:
            raise SystemExit(f"opsdroid refused a socket: {response.status}")
        sock = json.loads(await response.text())["socket"]
    ws = await http.ws_connect(base.replace("http", "ws") + f"/connector/websocket/{sock}")

    async def send(text: str) -> None:
        await ws.send_str(json.dumps({"message": text, "user": f"u{n}", "socket": sock}))
        reply = await ws.receive()
        if reply.data != text:
            raise Misrouted(f"{reply.data!r} for {text!r}")

    return send


async def http_client(http: aiohttp.ClientSession, base: str, n: int) -> Send:
    counter = 0

    async def send(text: str) -> None:
        nonlocal counter
        counter += 1
        mid = f"m{n}x{counter}"
        async with http.post(base + "/api/v1/chat", json={
            "conversation_id": f"c{n}", "user_id": f"u{n}", "text": text, "message_id": mid,
        }) as response:
            body = await response.json()
        if (response.status, body.get("message_id"), body.get("text")) != (200, mid, text):
            raise Misrouted(f"{response.status} {body} for {mid}")

    return send


@dataclass
class Result:
    """One server's figures in one round."""

    rate: float
    latencies: list[float]
    errors: int
    server_cpu: float  # seconds, over the measured messages
    redis_cpu: float
    messages: int
    notes: list[str] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its children so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(child) for child in f.read().split()]
    except OSError:
        children = []
    return own + sum(cpu_seconds(child) for child in children)


def redis_stats(url: str, messages: int) -> str:
    """``INFO commandstats`` of the Redis at ``url``, per message, busiest first, and
    its reads (round trips: each a wake-up, a read and a write) per message."""
    with Redis.from_url(url) as client:
        stats: dict[str, dict[str, float]] = client.info("commandstats")
        reads = int(client.info("stats")["total_reads_processed"])
    rows = sorted(((name.removeprefix("cmdstat_"), s["calls"], s["usec"])
                   for name, s in stats.items()), key=lambda row: -row[2])
    lines = [f"  redis: {reads / messages:.2f} reads (round trips) per message; commands per "
             f"message ({messages} messages; scripts include what they call):",
             f"    {'command':<24} {'calls/msg':>10} {'µs/call':>8} {'µs/msg':>8}"]
    lines += [f"    {name:<24} {calls / messages:10.2f} {usec / calls:8.2f} "
              f"{usec / messages:8.2f}" for name, calls, usec in rows]
    return "\n".join(lines)


async def drive(base: str, client: Client, pids: list[int], args: argparse.Namespace,
                profile: Path | None = None, redis_url: str | None = None) -> Result:
    """Warm up, then send ``args.messages`` and measure (and profile the server into
    ``profile``)."""
    latencies: list[float] = []
    errors: list[str] = []
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=args.clients * 2)
    ) as http:
        senders = await asyncio.gather(*(client(http, base, n) for n in range(args.clients)))

        async def run(total: int, record: bool) -> None:
            left = total

            async def one(n: int, send: Send) -> None:
                nonlocal left
                i = 0
                while left > 0:
                    left -= 1
                    i += 1
                    started = time.perf_counter()
                    try:
                        await send(f"hello number {i} from client {n}, how are you today?")
                    except Misrouted as exc:
                        errors.append(str(exc))
                    if record:
                        latencies.append(time.perf_counter() - started)

            await asyncio.gather(*(one(n, s) for n, s in enumerate(senders)))

        await run(args.warmup, record=False)
        errors.clear()
        spy = None
        if profile is not None:
            spy = await asyncio.create_subprocess_exec(
                "py-spy", "record", "--pid", str(pids[0]), "--format", "raw", "--output",
                str(profile), "--rate", "200", "--nonblocking",
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(2.0)  # attached
        if redis_url is not None:
            with Redis.from_url(redis_url) as stats:
                stats.config_resetstat()
        before = [cpu_seconds(pid) for pid in pids]
        started = time.perf_counter()
        await run(args.messages, record=True)
        elapsed = time.perf_counter() - started
        after = [cpu_seconds(pid) for pid in pids]
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            await spy.wait()
    used = [b - a for a, b in zip(before, after, strict=True)] + [0.0]
    if redis_url is not None:
        print(redis_stats(redis_url, len(latencies)))
    return Result(len(latencies) / elapsed, latencies, len(errors), used[0], used[1],
                  len(latencies), errors[:3])


async def bench(name: str, folder: Path, args: argparse.Namespace, venv: Path | None
                ) -> Result:
    loop = "uvloop" if args.loop == "auto" else args.loop
    if name == "opsdroid-ws":
        assert venv is not None
        server = opsdroid_server(folder, venv, args.clients)
        health, client = "/", opsdroid_ws_client
    elif name.startswith("aiohttp-"):
        server = aiohttp_server(folder, loop)
        health = "/healthz"
        client = opsdroid_ws_client if name == "aiohttp-ws" else http_client
    else:
        base_name, _, times = name.partition("-x")
        server = parley_server(folder, args.loop, int(times or 1))
        health = "/healthz"
        client = parley_ws_client if base_name == "parley-ws" else http_client
    profile = None
    if args.py_spy and name.startswith("parley"):
        profile = Path(args.py_spy) / f"{folder.name}.txt"
    with server as (base, proc, pids, redis_url):
        await wait_http(base + health, proc)
        result = await drive(base, client, pids, args, profile,
                             redis_url if args.redis_stats else None)
    if profile is not None and profile.exists():
        print(table(profile, 1e6 * result.server_cpu / result.messages))
    return result


def report(results: dict[str, list[Result]], args: argparse.Namespace) -> None:
    load = os.getloadavg()
    print(f"\n{args.clients} clients, {args.messages} messages per server and round (after "
          f"{args.warmup} to warm up), {args.rounds} round(s); load average now "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPUs")
    print(f"  {'server':<13} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'server µs/msg':>14} {'redis µs/msg':>13} {'errors':>7}")
    for name, rounds in results.items():
        for r in rounds:
            ms = [1000 * percentile(r.latencies, q) for q in (0.5, 0.99)]
            redis = f"{1e6 * r.redis_cpu / r.messages:13.0f}" if r.redis_cpu else f"{'-':>13}"
            print(f"  {name:<13} {r.rate:8,.0f} {ms[0]:8.1f} {ms[1]:8.1f} "
                  f"{1e6 * r.server_cpu / r.messages:14.0f} {redis} {r.errors:7d}")
            for note in r.notes:
                print(f"      e.g. {note[:160]}")

    def cpu(name: str) -> float:
        return statistics.median((r.server_cpu + r.redis_cpu) / r.messages
                                 for r in results[name])

    def rate(name: str) -> float:
        return statistics.median(r.rate for r in results[name])

    for mine, peer in (("parley-ws", "opsdroid-ws"), ("parley-ws", "aiohttp-ws"),
                       ("opsdroid-ws", "aiohttp-ws"), ("parley-http", "aiohttp-http")):
        if mine in results and peer in results:
            print(f"  {mine} / {peer}: {rate(mine) / rate(peer):.2f}x messages/s, "
                  f"{cpu(mine) / cpu(peer):.2f}x CPU per message (server + redis, medians)")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The load generator's loop: uvloop where installed, to leave the servers more CPU."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", help=f"comma-separated, of {', '.join(SERVERS)}")
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                        help="Parley's event loop (and the bare aiohttp server's)")
    parser.add_argument("--opsdroid-venv", help="make (or reuse) opsdroid's virtualenv here")
    parser.add_argument("--py-spy", metavar="DIR", help="profile Parley into DIR (py-spy)")
    parser.add_argument("--redis-stats", action="store_true",
                        help="print Parley's Redis commands per message (INFO commandstats)")
    parser.add_argument("--parley-processes", default="1", metavar="N[,N...]",
                        help="measure Parley with `parley run --processes N`, once per N")
    args = parser.parse_args()
    counts = [int(n) for n in args.parley_processes.split(",")]
    names = [f"{n}-x{count}" if count > 1 and n.startswith("parley") else n
             for n in SERVERS if args.only is None or n in args.only.split(",")
             for count in (counts if n.startswith("parley") else [1])]
    results: dict[str, list[Result]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="parley-peers-") as tmp:
        venv = None
        if "opsdroid-ws" in names:
            venv = opsdroid_venv(Path(args.opsdroid_venv) if args.opsdroid_venv
                                 else Path(tmp) / "venv")
        for round_ in range(args.rounds):
            for name in names:
                folder = Path(tmp) / f"{name}-{round_}"
                folder.mkdir()
                with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                    result = runner.run(bench(name, folder, args, venv))
                results[name].append(result)
                print(f"round {round_ + 1} {name}: {result.rate:,.0f} messages/s, "
                      f"{result.errors} errors", flush=True)
    report(results, args)


if __name__ == "__main__":
    main()

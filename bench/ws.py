"""The widget's WebSocket path under load, against opsdroid 0.31's websocket connector.

Both servers run as their own process on this machine and are driven by the same load
generator (this process): ``--clients`` WebSockets, each sending its next message as soon
as the reply to the last one has arrived. Parley runs its whole pipeline per message:
a signed session per client, the WebSocket API with numbered events kept for resuming,
the echo generator, Redis memory (a private redis-server on a unix socket) and the
moderation filters (flood control off: it would rightly stop a benchmark). A reply ends
at its ``final`` event. opsdroid runs an echo skill (``match_regex(".*")``) behind its
websocket connector, with ``max-connections`` raised from its default of 10; a reply
is its one text frame.

    python bench/ws.py                                 # both, 64 clients
    python bench/ws.py --only parley --messages 5000
    python bench/ws.py --opsdroid-venv /tmp/opsdroid-venv   # reuse a venv made before

opsdroid goes into a throw-away virtualenv made by this script (``opsdroid==0.31.0``,
``setuptools<81`` for its ``pkg_resources``), in a temporary folder unless
``--opsdroid-venv`` names one to make or reuse. Prints messages/s and latency
percentiles (send to end of reply) for each, measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline import private_redis

ORIGIN = "http://bench.local"
ECHO_SKILL = '''
from opsdroid.matchers import match_regex
from opsdroid.skill import Skill


class Echo(Skill):
    @match_regex(r"(?s).*")
    async def echo(self, message):
        await message.respond(message.text)
'''

# One client: open its socket, then ``send(text) -> awaitable reply``.
Client = Callable[[aiohttp.ClientSession, str, int], Awaitable[Callable[[str], Awaitable[None]]]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_http(url: str, proc: subprocess.Popen[bytes], seconds: float = 120.0) -> None:
    """Wait until ``url`` answers (any status), or fail if the server died."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url):
                    return
            await asyncio.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {seconds:.0f} s")


@contextlib.contextmanager
def running(args: list[str], log: Path,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """The server ``args`` as a child process, its output in ``log``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def parley_client(http: aiohttp.ClientSession, base: str,
                        n: int) -> Callable[[str], Awaitable[None]]:
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
                raise SystemExit(f"parley refused a message: {frame}")
            for event in frame.get("events", ()):
                if event["message_id"] == mid and event["kind"] in ("final", "notice", "error"):
                    if event["kind"] != "final":
                        raise SystemExit(f"parley answered {event}")
                    return

    return send


async def opsdroid_client(http: aiohttp.ClientSession, base: str,
                          n: int) -> Callable[[str], Awaitable[None]]:
    async with http.post(base + "/connector/websocket") as response:
        if response.status != 200:
            raise SystemExit(f"opsdroid refused a socket: {response.status}")
        sock = json.loads(await response.text())["socket"]
    ws = await http.ws_connect(base.replace("http", "ws") + f"/connector/websocket/{sock}")

    async def send(text: str) -> None:
        await ws.send_str(json.dumps({"message": text, "user": f"u{n}", "socket": sock}))
        reply = await ws.receive()
        if reply.data != text:
            raise SystemExit(f"opsdroid answered {reply.data!r} to {text!r}")

    return send


async def load(base: str, client: Client, clients: int, messages: int,
               warmup: int) -> tuple[float, list[float]]:
    """messages/s and the latencies (seconds) of ``messages`` after ``warmup``."""
    latencies: list[float] = []
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=clients * 2)
    ) as http:
        senders = await asyncio.gather(*(client(http, base, n) for n in range(clients)))

        async def run(total: int, record: bool) -> None:
            left = total

            async def one(n: int, send: Callable[[str], Awaitable[None]]) -> None:
                nonlocal left
                i = 0
                while left > 0:
                    left -= 1
                    i += 1
                    started = time.perf_counter()
                    await send(f"hello number {i} from client {n}, how are you today?")
                    if record:
                        latencies.append(time.perf_counter() - started)

            await asyncio.gather(*(one(n, s) for n, s in enumerate(senders)))

        await run(warmup, record=False)
        started = time.perf_counter()
        await run(messages, record=True)
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def parley_config(folder: Path, port: int, redis_url: str, memory: str = "redis",
                  moderation: str = "filters") -> Path:
    path = folder / "wsbench.toml"
    path.write_text(f"""
[bot]
name = "wsbench"

[generation]
backend = "echo"

[memory]
backend = "{memory}"
url = "{redis_url}"
key_prefix = "wsbench-{secrets.token_hex(4)}"
timeout = 10.0  # the machine is shared: a slow moment must not become an error

[moderation]
backend = "{moderation}"
input_filters = ["size", "terms", "classifier", "pii", "injection"]

[adapters.web]
host = "127.0.0.1"
port = {port}
secret = "{secrets.token_hex(16)}"
allowed_origins = ["{ORIGIN}"]
# The load generator is one address sending as fast as it is answered.
session_rate = 1000000
ip_rate = 1000000
max_sockets_per_ip = 10000
""")
    return path


async def bench_parley(args: argparse.Namespace, folder: Path) -> tuple[float, list[float]]:
    port = free_port()
    with private_redis() as redis_url:
        config = parley_config(folder, port, redis_url, args.memory, args.moderation)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        command = [sys.executable, "-m", "core.cli", "run", str(config), "--adapter", "web"]
        if args.profile:
            command[1:1] = ["-m", "cProfile", "-o", args.profile]
        with running(command, folder / "server.log", env) as proc:
            await wait_http(f"http://127.0.0.1:{port}/healthz", proc)
            return await load(f"http://127.0.0.1:{port}", parley_client, args.clients,
                              args.messages, args.warmup)


def opsdroid_venv(path: Path) -> Path:
    python = path / "bin" / "python"
    if not (path / "bin" / "opsdroid").exists():
        print(f"making a virtualenv for opsdroid in {path} (a few minutes)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "opsdroid==0.31.0",
                        "setuptools<81"], check=True)
    return path


async def bench_opsdroid(args: argparse.Namespace, folder: Path) -> tuple[float, list[float]]:
    venv = opsdroid_venv(Path(args.opsdroid_venv) if args.opsdroid_venv else folder / "venv")
    port = free_port()
    skill = folder / "echo_skill.py"
    skill.write_text(ECHO_SKILL)
    config = folder / "opsdroid.yaml"
    config.write_text(f"""
logging:
  level: error
  console: false
welcome-message: false
web:
  host: 127.0.0.1
  port: {port}
connectors:
  websocket:
    max-connections: {args.clients * 4}
skills:
  echo:
    path: {skill}
""")
    env = {**os.environ, "HOME": str(folder)}  # opsdroid keeps its own files under ~
    command = [str(venv / "bin" / "opsdroid"), "start", "-f", str(config)]
    with running(command, folder / "server.log", env) as proc:
        await wait_http(f"http://127.0.0.1:{port}/", proc)
        return await load(f"http://127.0.0.1:{port}", opsdroid_client, args.clients,
                          args.messages, args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--only", choices=["parley", "opsdroid"])
    # The defaults are the comparison asked for; the others show where the time goes.
    parser.add_argument("--memory", choices=["redis", "embedded"], default="redis")
    parser.add_argument("--moderation", choices=["filters", "passthrough"], default="filters")
    parser.add_argument("--opsdroid-venv", help="make (or reuse) opsdroid's virtualenv here")
    parser.add_argument("--profile", help="write a cProfile of the Parley server to this file")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="parley-wsbench-") as tmp:
        for name, bench in (("opsdroid", bench_opsdroid), ("parley", bench_parley)):
            if args.only in (None, name):
                folder = Path(tmp) / name
                folder.mkdir()
                results[name] = asyncio.run(bench(args, folder))
    print(f"WebSocket echo, {args.clients} clients, {args.messages} messages each side "
          f"(after {args.warmup} to warm up), one run:")
    for name, (rate, latencies) in results.items():
        ms = [1000 * percentile(latencies, q) for q in (0.5, 0.9, 0.99)]
        print(f"  {name:<9} {rate:>8,.0f} messages/s   p50 {ms[0]:6.1f} ms   "
              f"p90 {ms[1]:6.1f} ms   p99 {ms[2]:6.1f} ms")
    if len(results) == 2:
        print(f"  parley / opsdroid: {results['parley'][0] / results['opsdroid'][0]:.2f}x "
              "messages/s")


if __name__ == "__main__":
    main()

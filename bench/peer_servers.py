"""The servers bench/peers.py measures, each started as its own process: Parley (``parley
run`` with a private redis-server), opsdroid 0.31 with an echo skill (in a virtualenv made
for it) and bare aiohttp echo servers (HTTP, and WebSocket speaking opsdroid's protocol);
and the helpers that start them and wait for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from redis import Redis

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

AIOHTTP_ECHO = '''
import json
import secrets
import sys
from aiohttp import WSMsgType, web


async def chat(request):
    body = await request.json()
    return web.json_response({"kind": "final", "text": body["text"], "action": "allow",
                              "conversation_id": body["conversation_id"],
                              "message_id": body.get("message_id", "")})


async def websocket_id(request):
    # opsdroid's websocket connector: a POST names a socket, a GET opens it.
    return web.json_response({"socket": secrets.token_hex(8)})


async def websocket(request):
    # Each frame {"message", "user", "socket"} is answered with its message as text, as
    # opsdroid's echo skill does; a receive() loop (async for costs a frame more).
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    while True:
        frame = await ws.receive()
        if frame.type is not WSMsgType.TEXT:
            break
        await ws.send_str(json.loads(frame.data)["message"])
    return ws


app = web.Application()
app.router.add_post("/api/v1/chat", chat)
app.router.add_post("/connector/websocket", websocket_id)
app.router.add_get("/connector/websocket/{socket}", websocket)
app.router.add_get("/healthz", lambda request: web.json_response({"status": "ok"}))
loop = None
if sys.argv[2] == "uvloop":
    import uvloop
    loop = uvloop.new_event_loop()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None,
            loop=loop)
'''


# A started server: its base URL, its process, and the processes whose CPU is counted.
# (base URL, process, pids whose CPU is the server's, its Redis URL if it has one)
Server = tuple[str, "subprocess.Popen[bytes]", list[int], str | None]


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


def opsdroid_venv(path: Path) -> Path:
    """A virtualenv with opsdroid 0.31 at ``path``, made unless it is there already."""
    python = path / "bin" / "python"
    if not (path / "bin" / "opsdroid").exists():
        print(f"making a virtualenv for opsdroid in {path} (a few minutes)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "opsdroid==0.31.0",
                        "setuptools<81"], check=True)
    return path


def demo_moderation() -> str:
    """config/demo.toml's [moderation] keys (its per-channel tables aside), as TOML."""
    with open(Path(__file__).resolve().parent.parent / "config" / "demo.toml", "rb") as f:
        section = tomllib.load(f)["moderation"]
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in section.items()
                     if key != "channels" and not isinstance(value, dict)) + "\n" + "\n".join(
        f"{key} = {{ {', '.join(f'{k} = {json.dumps(v)}' for k, v in value.items())} }}"
        for key, value in section.items() if key != "channels" and isinstance(value, dict))


def parley_config(folder: Path, port: int, redis_url: str) -> Path:
    """The bench bot: Redis memory, the demo's moderation filters, the echo generator."""
    path = folder / "peers.toml"
    path.write_text(f"""
[bot]
name = "peers"

[generation]
backend = "echo"

[memory]
backend = "redis"
url = "{redis_url}"
key_prefix = "peers-{secrets.token_hex(4)}"
timeout = 10.0  # the machine is shared: a slow moment must not become an error

[moderation]
{demo_moderation()}
# A closed loop of clients sends hundreds a second per conversation; flood control
# still runs (and costs what it costs) with limits it cannot reach.
user_rate = 1000000000
conversation_rate = 1000000000

[adapters.web]
host = "127.0.0.1"
port = {port}
secret = "{secrets.token_hex(16)}"
allowed_origins = ["{ORIGIN}"]
session_rate = 1000000000
ip_rate = 1000000000
max_sockets_per_ip = 100000
""")
    return path


@contextlib.contextmanager
def parley_server(folder: Path, loop: str, processes: int = 1) -> Iterator[Server]:
    port = free_port()
    with private_redis() as redis_url:
        redis_pid = int(Redis.from_url(redis_url).info("server")["process_id"])
        config = parley_config(folder, port, redis_url)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # From the working directory's checkout (run it in another to compare two).
        command = [sys.executable, "-m", "core.cli", "run", str(config), "--adapter", "web"]
        if loop != "auto":
            command[3:3] = ["--loop", loop]
        if processes > 1:
            command += ["--processes", str(processes)]
        with running(command, folder / "parley.log", env) as proc:
            if processes > 1:  # every child serving before the clients connect
                await_line(folder / "parley.log", f"serving with {processes} processes", proc)
            yield f"http://127.0.0.1:{port}", proc, [proc.pid, redis_pid], redis_url


def await_line(log: Path, line: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while line not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {line!r} in {log}")
        time.sleep(0.1)


@contextlib.contextmanager
def opsdroid_server(folder: Path, venv: Path, clients: int) -> Iterator[Server]:
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
    max-connections: {clients * 4}
skills:
  echo:
    path: {skill}
""")
    env = {**os.environ, "HOME": str(folder)}  # opsdroid keeps its own files under ~
    command = [str(venv / "bin" / "opsdroid"), "start", "-f", str(config)]
    with running(command, folder / "opsdroid.log", env) as proc:
        yield f"http://127.0.0.1:{port}", proc, [proc.pid], None


@contextlib.contextmanager
def aiohttp_server(folder: Path, loop: str) -> Iterator[Server]:
    port = free_port()
    script = folder / "echo_server.py"
    script.write_text(AIOHTTP_ECHO)
    with running([sys.executable, str(script), str(port), loop], folder / "aiohttp.log") as proc:
        yield f"http://127.0.0.1:{port}", proc, [proc.pid], None

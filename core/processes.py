"""``parley run --processes N``: one bot's web channel served by N processes on one port.

The parent (:class:`Supervisor`) validates the file, then starts N children: the same
CLI (``python -m core.cli run ... --adapter web``) with an internal ``--child`` flag.
Each child runs the normal app with the web adapter's socket bound with
``SO_REUSEPORT``, so the kernel spreads new connections over the children; conversations
stay in order across them through the memory lease in Redis (as across front ends).

Each child holds one end of a socket pair to the parent (:class:`ParentLink`): it says
``ready`` there once its adapters serve, and stops by itself when the parent is gone
(EOF), so a SIGKILLed parent leaves no server behind.

The parent forwards SIGINT and SIGTERM to the children and waits for them. A child that
exits while the others serve is restarted after a back-off (1 s, doubling to 30 s; back
to 1 s after a minute of serving), with a log line each time; a child that fails before
every child served fails the run (a bad file, Redis unreachable: restarting would not
help). The run exits 0 when every child stopped cleanly when told and none crashed, 1
otherwise.

``/metrics`` adds up every child's counters and histograms: the parent gives the
children a private ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode),
removed when it exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from core.config import BotSettings
from core.errors import ConfigError
from core.ports import ListenAddress

if TYPE_CHECKING:
    from core.engine import Engine

log = logging.getLogger(__name__)

# The children's environment: prometheus_client's multiprocess folder (read when the
# child imports prometheus_client), and the widget's session secret when the file sets
# none (one random key per run, as one process makes for itself, but shared).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
SECRET_ENV = "PARLEY_PROCESSES_WEB_SECRET"

SHARED_ADAPTERS = ("web",)  # the adapters a child runs; the others must run once
FIRST_BACKOFF, MAX_BACKOFF, STEADY = 1.0, 30.0, 60.0  # seconds
STOP_TIMEOUT = 30.0  # for a child to stop when told (the web adapter drains for 10 s)
POLL = 0.2  # seconds between looks at the children while nothing is said on a link


def refuse_unshared(settings: BotSettings, adapters: Sequence[str],
                    addresses: Sequence[ListenAddress], count: int) -> None:
    """Raise a :class:`ConfigError` for what ``count`` processes cannot share.

    Conversations, dedupe and moderation counters must live in Redis; adapters that
    hold one connection per bot (Telegram polling, the Discord gateway, the terminal)
    must run once; a local model would be loaded, and batch alone, in every process.
    """
    src = settings.source
    problems = []
    if settings.memory.backend != "redis":
        problems.append(f"{src}: memory.backend: {settings.memory.backend!r} keeps "
                        f"conversations in each process: --processes {count} needs "
                        "\"redis\", which all of them share")
    if settings.moderation.state == "memory":
        problems.append(f"{src}: moderation.state: \"memory\" keeps flood and rate "
                        f"counters in each process: --processes {count} needs \"auto\" "
                        "or \"redis\"")
    if settings.generation.backend == "local":
        problems.append(f"{src}: generation.backend: \"local\" would load the model in "
                        f"each of the {count} processes, each batching alone: run it in "
                        "`parley worker` (one per GPU) and set generation.backend = "
                        "\"redis\" (docs/scale-out.md)")
    for name in adapters:
        if name not in SHARED_ADAPTERS:
            problems.append(f"{src}: adapters.{name}: runs once per bot: --processes serves "
                            f"the web channel only; start {name} on its own (`parley run "
                            f"{src} --adapter {name}`) and the web channel with `--adapter "
                            f"web --processes {count}`")
    if "web" not in adapters:
        problems.append(f"{src}: adapters.web: --processes {count} serves the web channel: "
                        "configure [adapters.web]")
    for address in addresses:
        if address.port == 0:
            problems.append(f"{src}: {address.key}.port: 0 (any free port) would give each "
                            f"process a port of its own: set the port to share")
    if problems:
        raise ConfigError("\n".join(problems))


def child_settings(settings: BotSettings, secret: str | None) -> BotSettings:
    """``settings`` as a child runs them: the web socket shared with its siblings
    (``reuse_port``) and, when the file sets no session secret, the run's one."""
    web = dict(settings.adapters.get("web", {}))
    web["reuse_port"] = True
    if secret is not None and web.get("secret") is None:
        web["secret"] = secret
    return settings.model_copy(update={"adapters": {**settings.adapters, "web": web}})


class ParentLink:
    """A child's link to its supervisor, run as the child's last adapter: its start
    says ``ready`` (every adapter before it serves); its ``wait`` returns when the
    supervisor is gone, which stops the child."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self, engine: Engine) -> None:
        """Tell the supervisor this child serves."""
        if self._writer is not None:
            return
        sock = socket.socket(fileno=self._fd)
        self._reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        self._writer.write(b"ready\n")
        await self._writer.drain()

    async def wait(self) -> None:
        """Return when the supervisor has closed its end (it exited, or was killed)."""
        assert self._reader is not None
        await self._reader.read()
        log.warning("the supervising process is gone: stopping")

    async def stop(self) -> None:
        """Close this end; idempotent."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclass
class _Child:
    """One of the supervisor's slots: the process now in it and its link."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    link: socket.socket | None = None
    ready_at: float | None = None
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None
    said: bytes = b""


class Supervisor:
    """Starts ``count`` children, restarts those that die, stops them all on a signal.

    ``command(index, fd)`` is a child's command line (``fd``: its end of the link).
    """

    def __init__(self, command: Callable[[int, int], list[str]], count: int) -> None:
        self._command = command
        self._children = [_Child(i) for i in range(count)]
        self._env = dict(os.environ)
        self._stopping = False
        self._crashed = False
        self._selector = selectors.DefaultSelector()

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM; returns the exit status (see the module)."""
        metrics_dir = tempfile.mkdtemp(prefix="parley-metrics-")
        self._env[METRICS_DIR_ENV] = metrics_dir
        self._env.setdefault(SECRET_ENV, secrets.token_urlsafe(32))
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        status = 1
        try:
            for child in self._children:
                self._start(child)
            status = self._until_serving()
            if status < 0:
                log.info("serving with %d processes", len(self._children))
                self._watch()
                status = 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            clean = self._stop_all()
            self._selector.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if status == 0 and (self._crashed or not clean):
            status = 1
        return status

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _start(self, child: _Child) -> None:
        ours, theirs = socket.socketpair()
        try:
            command = self._command(child.index, theirs.fileno())
            child.proc = subprocess.Popen(command, env=self._env, pass_fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        child.link, child.said, child.ready_at = ours, b"", None
        child.restart_at = None
        self._selector.register(ours, selectors.EVENT_READ, child)
        log.info("process %d started (pid %d)", child.index, child.proc.pid)

    def _listen(self) -> None:
        """Wait a little for news on the links; note the children that said ready."""
        for key, _ in self._selector.select(POLL):
            child: _Child = key.data
            try:
                data = key.fileobj.recv(64)  # type: ignore[union-attr]
            except OSError:
                data = b""
            if not data:  # the child closed its end: it is exiting
                self._forget_link(child)
                continue
            child.said += data
            if b"ready\n" in child.said and child.ready_at is None:
                child.ready_at = time.monotonic()
                log.info("process %d (pid %d) serving", child.index,
                         child.proc.pid if child.proc is not None else -1)

    def _forget_link(self, child: _Child) -> None:
        if child.link is not None:
            self._selector.unregister(child.link)
            child.link.close()
            child.link = None

    def _until_serving(self) -> int:
        """-1 once every child serves; else the status to exit with."""
        while not all(c.ready_at is not None for c in self._children):
            if self._stopping:
                return 0
            self._listen()
            for child in self._children:
                code = child.proc.poll() if child.proc is not None else None
                if code is not None and child.ready_at is None:
                    log.error("process %d exited with status %d before serving",
                              child.index, code)
                    return code if code > 0 else 1
        return -1

    def _watch(self) -> None:
        while not self._stopping:
            self._listen()
            now = time.monotonic()
            for child in self._children:
                if child.restart_at is not None:
                    if now >= child.restart_at and not self._stopping:
                        self._start(child)
                    continue
                assert child.proc is not None
                code = child.proc.poll()
                if code is None:
                    continue
                self._crashed = True
                self._forget_link(child)
                served = (now - child.ready_at) if child.ready_at is not None else 0.0
                delay = FIRST_BACKOFF if served >= STEADY else child.backoff
                child.backoff = min(delay * 2, MAX_BACKOFF)
                log.warning("process %d (pid %d) exited with status %d; restarting in %.0f s",
                            child.index, child.proc.pid, code, delay)
                child.restart_at = now + delay
                child.proc = None

    def _stop_all(self) -> bool:
        """SIGTERM to every child, SIGKILL to those still there after STOP_TIMEOUT;
        whether all stopped with status 0."""
        running = [c.proc for c in self._children if c.proc is not None]
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        clean = True
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in running:
            try:
                code = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("process pid %d did not stop in %.0f s: killed", proc.pid,
                          STOP_TIMEOUT)
                proc.kill()
                code = proc.wait()
            clean = clean and code == 0
        for child in self._children:
            self._forget_link(child)
        return clean


def child_command(argv: Sequence[str], index: int, fd: int) -> list[str]:
    """The command line of child ``index``: this interpreter running the CLI with
    ``argv`` (the parent's) and the internal ``--child`` flag."""
    return [sys.executable, "-m", "core.cli", *argv, "--child", f"{index}:{fd}"]


def parse_child(value: str) -> tuple[int, int]:
    """``--child INDEX:FD`` as (index, fd)."""
    index, fd = value.split(":")
    return int(index), int(fd)


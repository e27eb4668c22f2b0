"""A private ``redis-server`` for the test session, on a unix socket in a temporary folder.

It never touches a Redis the machine already runs (no TCP port is opened), keeps nothing on
disk, and can be killed, paused and restarted by tests that check how the code copes.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_START_TIMEOUT = 10.0


class RedisServer:
    """One ``redis-server`` process listening only on ``socket_path``."""

    def __init__(self, executable: str, workdir: Path) -> None:
        self.executable = executable
        self.workdir = workdir
        self.socket_path = workdir / "redis.sock"
        self.log_path = workdir / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        """The ``unix://`` URL clients connect to."""
        return f"unix://{self.socket_path}"

    @property
    def running(self) -> bool:
        """Whether the process is alive (it may be paused)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server if it is not running, and wait until it answers PING."""
        if self.running:
            self.resume()
            return
        args = [
            self.executable,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]
        # Early errors (a bad option) go to stderr, before the log file is open.
        with open(self.workdir / "stderr.log", "wb") as stderr:
            self._process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        self._paused = False
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start: {self._log_tail()}")
            if self._answers_ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"redis-server did not answer PING in {_START_TIMEOUT}s: {self._log_tail()}"
        )

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; its data is gone."""
        if self._process is not None and self.running:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()
        self._paused = False

    def restart(self) -> None:
        """Start the server again on the same socket (after :meth:`kill`), empty."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing is answered."""
        if self._process is not None and self.running:
            self._process.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        if self._process is not None and self._paused:
            self._process.send_signal(signal.SIGCONT)
            self._paused = False

    def stop(self) -> None:
        """Terminate the server and wait for it."""
        if self._process is None:
            return
        self.resume()
        if self.running:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def _answers_ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(str(self.socket_path))
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        tails = []
        for path in (self.workdir / "stderr.log", self.log_path):
            try:
                tails.append(path.read_text(errors="replace")[-2000:])
            except OSError:
                pass
        return "\n".join(t for t in tails if t.strip()) or "(no output)"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's own redis-server; see :class:`RedisServer`."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail(
            "redis-server is not on PATH; the memory tests run against a real one. "
            "Install it with `apt-get install redis-server` (the CI script does).",
            pytrace=False,
        )
    workdir = Path(tmp_path_factory.mktemp("redis"))
    own_dir = len(str(workdir / "redis.sock")) > 100
    if own_dir:
        # Unix socket paths are limited to ~108 bytes; fall back to a short one.
        workdir = Path(tempfile.mkdtemp(prefix="parley-redis-", dir="/tmp"))
    server = RedisServer(executable, workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of a running session server (restarted if an earlier test killed it)."""
    redis_server.start()
    return redis_server.url


@pytest.fixture
def memory_prefix() -> str:
    """A key prefix no other test uses, so tests share the server without meeting."""
    return f"test-{uuid.uuid4().hex[:12]}"

"""The interactive terminal as a user meets it: the real ``parley`` under a pseudo-terminal.

Ctrl-C and SIGTERM end it cleanly (exit 0 or 130, nothing on stderr about an abort),
and the web channel's access log stays off the terminal the console is using.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class Terminal:
    """``parley ARGS`` with a pty as stdin/stdout (so it is interactive) and stderr apart."""

    def __init__(self, *args: str) -> None:
        master, slave = pty.openpty()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "core.cli", *args],
            stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=REPO, env=env,
        )
        os.close(slave)
        self.master = master
        self.screen = b""
        self.errors = b""

    def _pump(self, timeout: float) -> None:
        assert self.process.stderr is not None
        ready, _, _ = select.select([self.master, self.process.stderr], [], [], timeout)
        for fd in ready:
            try:
                data = os.read(fd if isinstance(fd, int) else fd.fileno(), 65536)
            except OSError:  # the pty's other end is gone
                data = b""
            if fd is self.master:
                self.screen += data
            else:
                self.errors += data

    def expect(self, pattern: bytes, *, on_stderr: bool = False, timeout: float = 60) -> bytes:
        """Wait until ``pattern`` (a regex) shows up; return the match."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.errors if on_stderr else self.screen)
            if found:
                return found.group(0)
            if self.process.poll() is not None:
                self._pump(0.1)
                break
            self._pump(0.2)
        raise AssertionError(f"no {pattern!r}; screen {self.screen[-2000:]!r}, "
                             f"stderr {self.errors[-2000:]!r}")

    def type(self, line: str) -> None:
        """Type ``line`` and Enter."""
        os.write(self.master, line.encode() + b"\n")

    def finish(self, timeout: float = 30) -> int:
        """Wait for the exit status, collecting what is still written."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._pump(0.2)
        if self.process.poll() is None:
            self.process.kill()
            raise AssertionError(f"still running; stderr {self.errors[-2000:]!r}")
        self._pump(0.1)
        assert self.process.stderr is not None
        self.errors += self.process.stderr.read()
        os.close(self.master)
        return self.process.returncode


def bot_file(tmp_path: Path, adapters: str) -> Path:
    path = tmp_path / "term.toml"
    path.write_text('[bot]\nname = "term"\n[generation]\nbackend = "echo"\n'
                    f'[memory]\nbackend = "embedded"\n{adapters}', encoding="utf-8")
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_chat_ends_cleanly_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    term = Terminal("chat", str(bot_file(tmp_path, "[adapters.console]\n")))
    term.expect(rb"you> ")
    term.type("hello there")
    term.expect(rb"bot> hello there\r?\n")
    term.expect(rb"you> $")  # waiting on the next line, as a user at the prompt
    term.process.send_signal(sig)
    status = term.finish()
    assert status in (0, 130), term.errors.decode(errors="replace")
    assert b"Fatal Python error" not in term.errors
    assert b"Traceback" not in term.errors


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_run_with_web_and_console_ends_cleanly_and_keeps_access_logs_off(
    tmp_path: Path, sig: signal.Signals
) -> None:
    path = bot_file(tmp_path, '[adapters.web]\nport = 0\n[adapters.console]\n')
    term = Terminal("run", str(path))
    port = int(term.expect(rb"web adapter on http://127\.0\.0\.1:(\d+)/", on_stderr=True)
               .rsplit(b":", 1)[1].strip(b"/"))
    term.expect(rb"you> ")
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/chat", method="POST",
        data=json.dumps({"conversation_id": "c", "user_id": "u", "text": "ping"}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["text"] == "ping"
    term.type("hello")
    term.expect(rb"bot> hello\r?\n")
    term.process.send_signal(sig)
    status = term.finish()
    assert status in (0, 130), term.errors.decode(errors="replace")
    assert b"Fatal Python error" not in term.errors
    assert b"Traceback" not in term.errors
    assert b"aiohttp.access" not in term.errors + term.screen
    assert b"POST /api/v1/chat" not in term.errors + term.screen

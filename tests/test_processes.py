"""``parley run --processes N``: N real processes serving one web port, on the session's
redis-server, their generator the fake OpenAI-compatible server of test_scale_out (which
answers "<message> saw <user turns before it>", so every stored reply shows its history).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp
import pytest

from core.cli import main
from tests.test_scale_out import _SAW, fake_model, free_port, stored_turns

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, *, port: int, redis_url: str, prefix: str,
                 model_url: str = "http://127.0.0.1:9/v1", memory: str = "redis",
                 generation: str = "openai", extra: str = "") -> Path:
    config = tmp_path / "bot.toml"
    config.write_text(
        '[bot]\nname = "scaled"\n'
        f'[generation]\nbackend = "{generation}"\n' +
        (f'url = "{model_url}"\nmodel = "fake"\n' if generation == "openai" else "") +
        f'[memory]\nbackend = "{memory}"\nurl = "{redis_url}"\nkey_prefix = "{prefix}"\n'
        "window = 200\n"
        f"[adapters.web]\nport = {port}\n" + extra,
        encoding="utf-8",
    )
    return config


class Run:
    """A ``parley run --processes N`` and its log (stderr, every process's lines)."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, port: int) -> None:
        self.proc, self.log, self.port = proc, log, port
        self.url = f"http://127.0.0.1:{port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, *,
                 running: bool = True) -> list[re.Match[str]]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = list(re.finditer(pattern, self.text()))
            if len(found) >= count:
                return found
            if running and self.proc.poll() is not None:
                pytest.fail(f"parley run exited ({self.proc.returncode}): {self.text()[-3000:]}")
            time.sleep(0.1)
        pytest.fail(f"no {pattern!r} in the log: {self.text()[-3000:]}")

    def child_pids(self) -> dict[int, list[int]]:
        pids: dict[int, list[int]] = {}
        for match in re.finditer(r"process (\d+) started \(pid (\d+)\)", self.text()):
            pids.setdefault(int(match[1]), []).append(int(match[2]))
        return pids


@contextmanager
def supervised(tmp_path: Path, config: Path, port: int, processes: int) -> Iterator[Run]:
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "--log-level", "info", "run", str(config),
             "--processes", str(processes)],
            cwd=REPO, stdout=out, stderr=out)
    run = Run(proc, log, port)
    try:
        run.wait_for(f"serving with {processes} processes")
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pids in run.child_pids().values():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@asynccontextmanager
async def two_processes(tmp_path: Path, redis_url: str, prefix: str,
                        delay: float = 0.0) -> AsyncIterator[Run]:
    """``parley run --processes 2`` on a fake model whose replies wait ``delay`` s."""
    port = free_port()
    async with fake_model(delay=delay) as (_, model_url):
        config = write_config(tmp_path, port=port, redis_url=redis_url, prefix=prefix,
                              model_url=model_url)
        with supervised(tmp_path, config, port, 2) as run:
            yield run


async def send(url: str, text: str, conversation: str = "room") -> tuple[int, dict[str, str]]:
    # A connection per request: the kernel picks a process per connection.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        body = {"conversation_id": conversation, "user_id": "u1", "text": text}
        async with http.post(f"{url}/api/v1/chat", json=body) as response:
            return response.status, await response.json()


def served_by(run: Run) -> set[str]:
    return set(re.findall(r"\[process (\d+)\] aiohttp\.access: .*POST /api/v1/chat", run.text()))


def answered(metrics: str) -> float:
    return sum(float(m[1]) for m in re.finditer(
        r'^parley_messages_total\{[^}]*outcome="answered"[^}]*\} (\S+)$', metrics, re.M))


def stop(run: Run) -> int:
    run.proc.send_signal(signal.SIGTERM)
    return run.proc.wait(timeout=60)


async def test_two_processes_share_one_port_and_one_conversation_stays_in_order(
    tmp_path: Path, redis_url: str, memory_prefix: str
) -> None:
    async with two_processes(tmp_path, redis_url, memory_prefix, 0.05) as run:
        async def one(i: int) -> tuple[int, dict[str, str]]:
            await asyncio.sleep(i * 0.02)  # arrivals spread, replies overlapping
            return await send(run.url, f"m{i}")

        results = await asyncio.gather(*(one(i) for i in range(24)))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{run.url}/metrics") as response:
                metrics = await response.text()
        pids = run.child_pids()
        status = stop(run)
    assert [code for code, _ in results] == [200] * 24, results
    # Both processes answered (24 connections; all on one: 2**-23), and /metrics of
    # either counts every process's messages, not its own.
    assert served_by(run) == {"0", "1"}, run.text()[-3000:]
    assert answered(metrics) == 24, metrics
    turns = await stored_turns(redis_url, memory_prefix)
    users = [t["text"] for t in turns if t["role"] == "user"]
    replies = [t["text"] for t in turns if t["role"] == "assistant"]
    assert [t["role"] for t in turns] == ["user", "assistant"] * 24
    for position, (user, reply) in enumerate(zip(users, replies, strict=True)):
        assert _SAW.match(reply) is not None, reply
        assert reply == f"{user} saw {position}", (position, users, replies)
    # SIGTERM stopped every child cleanly, and the run with them.
    assert status == 0, run.text()[-3000:]
    assert sorted(pids) == [0, 1]
    for (pid,) in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_child_that_dies_is_restarted_and_the_run_says_so(
    tmp_path: Path, redis_url: str, memory_prefix: str
) -> None:
    async with two_processes(tmp_path, redis_url, memory_prefix, 0.0) as run:
        (victim,) = run.child_pids()[1]
        os.kill(victim, signal.SIGKILL)
        run.wait_for(r"process 1 \(pid \d+\) exited with status -9; restarting in 1 s")
        run.wait_for(r"process 1 \(pid \d+\) serving", count=2)
        results = await asyncio.gather(*(send(run.url, f"m{i}", f"c{i}") for i in range(8)))
        status = stop(run)
    assert [code for code, _ in results] == [200] * 8, results
    assert len(run.child_pids()[1]) == 2
    assert status == 1  # it served on, but a crash is not a clean run


async def test_children_stop_when_the_supervisor_is_killed(
    tmp_path: Path, redis_url: str, memory_prefix: str
) -> None:
    async with two_processes(tmp_path, redis_url, memory_prefix, 0.0) as run:
        run.proc.kill()
        run.proc.wait()
        run.wait_for("the supervising process is gone: stopping", count=2, running=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", run.port), 0.5).close()
            except OSError:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the children still listen after their supervisor died")


@pytest.mark.parametrize(("changes", "expected"), [
    ({"memory": "embedded"}, "memory.backend: 'embedded' keeps conversations in each process"),
    ({"generation": "local"}, 'generation.backend: "local" would load the model in each of'),
    ({"extra": '[moderation]\nstate = "memory"\n'}, 'moderation.state: "memory" keeps'),
    ({"extra": "[adapters.console]\n"}, "adapters.console: runs once per bot"),
    ({"port": 0}, "adapters.web.port: 0 (any free port)"),
])
def test_what_processes_cannot_share_is_refused_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_url: str,
    changes: dict[str, object], expected: str,
) -> None:
    fields: dict[str, object] = {"port": free_port(), "generation": "echo", **changes}
    config = write_config(tmp_path, redis_url=redis_url, prefix="refused", **fields)  # type: ignore[arg-type]
    assert main(["run", str(config), "--processes", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: {expected}" in err, err


def test_processes_must_be_a_positive_count(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "bot.toml", "--processes", "0"])
    assert "--processes: must be at least 1, not 0" in capsys.readouterr().err

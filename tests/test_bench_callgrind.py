"""bench/callgrind.py, what the instruction-counting benches read callgrind's dumps with, and
bench/pipeline.py's private redis-server, which bench/redis_cost.py runs under valgrind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from redis import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import callgrind  # noqa: E402
from bench.pipeline import private_redis  # noqa: E402

DUMP = """# callgrind format
version: 1
creator: callgrind-3.22.0
pid: 4242
cmd:  redis-server --port 0
part: 2

desc: I1 cache:
desc: Trigger: dump begin

positions: line
events: Ir
summary: 9535000

fn=(1) main
0 12
totals: 9535864
"""


def test_total_and_trigger_of_a_dump(tmp_path: Path) -> None:
    dump = tmp_path / "cg.4242.2"
    dump.write_text(DUMP)
    assert callgrind.total(dump) == 9535000  # summary: (what the benches always read)
    assert callgrind.total(dump, "totals") == 9535864
    assert callgrind.trigger(dump) == "begin"


def test_a_dump_at_exit_has_no_trigger(tmp_path: Path) -> None:
    dump = tmp_path / "cg.4242"
    dump.write_text(DUMP.replace("desc: Trigger: dump begin\n",
                                 "desc: Trigger: Program termination\n"))
    assert callgrind.trigger(dump) is None
    assert callgrind.total(dump) == 9535000


def test_totals_alone_are_read(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.out"
    dump.write_text(DUMP.replace("summary: 9535000\n", ""))
    assert callgrind.total(dump) == callgrind.total(dump, "totals") == 9535864


@pytest.mark.parametrize("text", ["", DUMP.replace("summary: 9535000\n", "")
                                  .replace("totals: 9535864\n", "")])
@pytest.mark.parametrize("line", ["summary", "totals"])
def test_a_file_without_a_total_is_an_error_not_0(tmp_path: Path, text: str,
                                                   line: Literal["summary", "totals"]) -> None:
    dump = tmp_path / "cg.1"
    dump.write_text(text)
    with pytest.raises(ValueError, match=f"no '{line}:' line"):
        callgrind.total(dump, line)


def test_command() -> None:
    assert callgrind.command("/tmp/cg.%p", ["python", "x.py"], "--instr-atstart=no") == [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/tmp/cg.%p",
        "--instr-atstart=no", "python", "x.py"]


needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="needs redis-server")


@needs_redis
def test_private_redis_under_a_wrapper_answers_with_its_own_pid(tmp_path: Path) -> None:
    marker = tmp_path / "wrapped"
    with private_redis(["sh", "-c", f'echo "$$" > {marker}; exec "$@"', "sh"]) as url:
        with Redis.from_url(url) as client:
            pid = int(client.info("server")["process_id"])
            assert client.ping()
        assert int(marker.read_text()) == pid  # the wrapper's process is the server's
    with pytest.raises(ProcessLookupError):  # ended (and reaped) on leaving
        os.kill(pid, 0)


@needs_redis
def test_private_redis_that_never_answers_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="ended"), private_redis(["false"]):
        pytest.fail("yielded a server that is not there")


@needs_redis
def test_private_redis_that_answers_too_late_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="did not answer within"), \
            private_redis(["sh", "-c", "exec sleep 30", "sh"], wait=0.2):
        pytest.fail("yielded a server that is not there")


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_icount_counts_a_statement() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "icount.py"), "x = 1", "x + 1"],
                          capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    count, statement = done.stdout.split(None, 1)
    assert statement.strip() == "x + 1"
    assert int(count.replace(",", "")) > 0


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_guard_instructions_ends_its_child_when_callgrind_control_fails(tmp_path: Path) -> None:
    # A callgrind_control that fails, and notes the pid it was asked about: the child's.
    tools = tmp_path / "bin"
    tools.mkdir()
    asked = tmp_path / "asked"
    control = tools / "callgrind_control"
    control.write_text(f'#!/bin/sh\necho "$@" >> {asked}\nexit 1\n')
    control.chmod(0o755)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "guard.py"), "--instructions", "--messages", "4"],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
        env={**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"})
    assert done.returncode != 0
    assert "CalledProcessError" in done.stderr
    child = int(asked.read_text().split()[-1])
    try:
        os.kill(child, 0)
    except ProcessLookupError:
        return  # ended, and reaped
    os.kill(child, 9)
    pytest.fail("the child under valgrind was left running")

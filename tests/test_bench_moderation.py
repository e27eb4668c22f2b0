"""bench/moderation.py runs as its users run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "moderation.py"


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), "--no-heldout", *args],
                          capture_output=True, text=True, timeout=300, check=False)


def test_rounds_0_evaluates_without_latency_rounds() -> None:
    done = bench("--rounds", "0")
    assert done.returncode == 0, done.stderr
    assert "recall insult" in done.stdout
    assert "check_input latency: not measured (--rounds 0)" in done.stdout
    assert "output guard" in done.stdout


def test_a_negative_round_count_is_refused() -> None:
    done = bench("--rounds", "-1")
    assert done.returncode == 2
    assert "--rounds: must be 0 or more" in done.stderr

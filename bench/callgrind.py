"""What the benches that count instructions share about valgrind's callgrind: the
command that runs a program under it, and what its dump files say (the instruction
total; the dump's trigger, where a bench dumps by name with ``callgrind_control``).

Each bench keeps its own way of starting and stopping collection (``--zero``/``--dump``,
``--toggle-collect``, ``--instr-atstart=no``), so its figures stay comparable with those
already in docs/performance.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

_SUMMARY = re.compile(r"^(?:summary|totals): (\d+)", re.M)  # (summary: comes first)
_TOTALS = re.compile(r"^totals: (\d+)", re.M)
_TRIGGER = re.compile(r"^desc: Trigger: dump (\S+)", re.M)


def command(out: str | Path, program: list[str], *options: str) -> list[str]:
    """``program`` run under callgrind with ``options``, its dump(s) written to ``out``
    (callgrind's ``%p`` for the process id allowed)."""
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *options,
            *program]


def total(path: Path, line: Literal["summary", "totals"] = "summary") -> int:
    """The instructions the dump at ``path`` counted; ValueError if it says none (not a
    callgrind dump, or one cut short), rather than a silent 0.

    ``summary`` (its ``summary:`` line, else its ``totals:``) is callgrind's own count
    for the dump, what bench/engine_cost.py, icount.py, redis_cost.py and input_checks.py
    have always reported. ``totals`` is the sum of the costs the file lists, a little
    more (0.01-0.5 %), what bench/guard.py reports: with instrumentation switched off and
    on (``--instr-atstart=no``, ``callgrind_control -i``) the summary of the dump at exit
    is garbage (it wraps below 0).
    """
    found = (_SUMMARY if line == "summary" else _TOTALS).search(
        path.read_text(errors="replace"))
    if found is None:
        raise ValueError(f"{path}: no '{line}:' line (not a callgrind dump?)")
    return int(found[1])


def trigger(path: Path) -> str | None:
    """The name the dump at ``path`` was made under (``callgrind_control --dump NAME``),
    or None (a dump at exit, say)."""
    found = _TRIGGER.search(path.read_text(errors="replace"))
    return found[1] if found else None

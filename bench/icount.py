"""Instructions per execution of Python statements, counted by callgrind.

For the small costs a message is made of (building an event, a metric's increment), which
a wall-clock timer on a shared, loaded machine cannot tell apart: each statement runs
20,000 times under valgrind's callgrind (after a warm-up round), less the count of as
many turns of an empty loop.

    python bench/icount.py "from core.types import Turn" "Turn('user', 'hi')"

The first argument is the set-up, run once; each further one is a statement to count.
Run it from a checkout's root to measure that checkout's code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

TIMES = 20_000


def control(*args: str) -> None:
    """callgrind_control on this process, which keeps running meanwhile (a process blocked
    in a system call answers it only through ptrace)."""
    proc = subprocess.Popen(["callgrind_control", *args, str(os.getpid())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        pass


def child(setup: str, statements: list[str]) -> None:
    sys.path.insert(0, os.getcwd())  # the checkout's code, not the installed one's
    names: dict[str, object] = {}
    exec(setup, names)
    for i, statement in enumerate(["pass", *statements]):
        code = compile(f"for _ in range({TIMES}):\n    {statement}\n", "<counted>", "exec")
        exec(code, names)  # warm-up
        control("--zero")
        exec(code, names)
        control("--dump", f"s{i}")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
        return
    if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    # (here, not at the top: the counted child imports nothing more than it did)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import callgrind

    with tempfile.TemporaryDirectory(prefix="icount-") as tmp:
        subprocess.run(callgrind.command(f"{tmp}/cg.%p",
                                         [sys.executable, __file__, "--child", *sys.argv[1:]]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        totals: dict[str, int] = {}
        for path in Path(tmp).glob("cg.*.*"):
            name = callgrind.trigger(path)
            if name is not None:
                totals[name] = callgrind.total(path)
    for i, statement in enumerate(sys.argv[2:], 1):
        print(f"{(totals[f's{i}'] - totals['s0']) / TIMES:9,.0f}  {statement}")


if __name__ == "__main__":
    main()

"""What bench/peers.py's echo bot checks, for the benches that time one of its stages with
a checkout's code (bench/guard.py, bench/input_checks.py): config/demo.toml's moderation
filters (flood limits out of reach), its clients' messages, and runs of two checkouts in
turn. ``core`` is imported on use, from the checkout the caller put first on sys.path.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any


def demo_settings(code: Path) -> Any:
    """The bot's settings: checkout ``code``'s config/demo.toml [moderation] with flood
    limits it cannot reach, embedded memory, the echo generator."""
    from core.config import parse_settings

    section = tomllib.loads((code / "config" / "demo.toml").read_text())["moderation"]
    section = {k: v for k, v in section.items() if k != "channels"}
    return parse_settings({
        "bot": {"name": "peers"}, "generation": {"backend": "echo"},
        "memory": {"backend": "embedded"},
        "moderation": {**section, "user_rate": 10**9, "conversation_rate": 10**9}})


def peer_messages(count: int) -> list[Any]:
    """``count`` messages as bench/peers.py's 64 clients send them, each its own id."""
    from core.types import IncomingMessage

    return [IncomingMessage(bot="peers", channel="web", conversation_id=f"c{i % 64}",
                            user_id=f"u{i % 64}", message_id=uuid.uuid4().hex,
                            text=f"hello number {i // 64 + 1} from client {i % 64}, "
                                 "how are you today?")
            for i in range(count)]


def checkout_arguments(parser: argparse.ArgumentParser, root: Path, messages: int,
                       rounds: int) -> None:
    """The arguments of such a bench: --messages, --rounds, --code (``root`` by default),
    --compare and --repeat."""
    parser.add_argument("--messages", type=int, default=messages)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--code", type=Path, default=root, help="the checkout to measure")
    parser.add_argument("--compare", type=Path, help="another checkout to run in turn")
    parser.add_argument("--repeat", type=int, default=4, help="runs of each, with --compare")


def in_turn(script: str, codes: list[Path], args: list[str], repeat: int
            ) -> dict[Path, list[str]]:
    """The output of ``script --code CODE *args`` for each checkout, ``repeat`` times each,
    each run in a fresh process and the checkouts in turn (the machine's load moves;
    taking turns shares it out)."""
    results: dict[Path, list[str]] = {code: [] for code in codes}
    for i in range(repeat):
        for code in codes[:: 1 if i % 2 == 0 else -1]:
            results[code].append(subprocess.run(
                [sys.executable, script, "--code", str(code), *args],
                capture_output=True, text=True, check=True).stdout.strip())
    return results

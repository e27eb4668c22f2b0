"""Where a server's CPU goes per message, from a py-spy profile in raw (collapsed) form.

Each sample's stack is charged to one stage: the innermost frame that belongs to a
known part (moderation's output guard or input checks, memory, the Redis client, the
web channel's parts, aiohttp, JSON, metrics, the engine...), the event loop if none
does. Moderation's helpers (the term filter, PII, the classifier, normalising...) serve
both sides: a sample in them goes to the side whose frame is nearest above it (see
``_moderation_side``). With the server's CPU per message (bench/peers.py prints it) the
shares become microseconds per message.

    py-spy record --pid PID --format raw --output profile.txt --rate 200 --nonblocking
    python bench/stages.py profile.txt --us-per-message 1250
    python bench/peers.py --only parley-ws --py-spy /tmp/profiles   # both steps
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

# (substring of a frame, stage); the first that an inner frame matches wins.
PARTS = [
    ("json/", "json (stdlib)"), ("orjson", "json (orjson)"), ("core/jsoncodec.py", "json (orjson)"),
    ("prometheus_client", "metrics"),
    ("core/redis_client.py", "redis client"), ("core/redis_pipeline.py", "redis client"),
    ("redis/", "redis client"),
    ("hiredis", "redis client"),
    ("aiohttp/", "aiohttp (HTTP/WebSocket)"),
    ("core/moderation/state_redis.py", "moderation: state"),
    ("core/moderation/", "moderation: input checks"),
    ("core/memory/", "memory"), ("bots/web/resume.py", "web: resume log"),
    ("bots/web/writer.py", "web: resume log"),
    ("bots/web/ws.py", "web: socket"), ("bots/web/hub.py", "web: hub"),
    ("bots/web/", "web: HTTP API"), ("core/generation/", "generator (echo)"),
    ("core/lanes.py", "engine"), ("core/engine.py", "engine"), ("core/plugin", "engine"),
    ("core/streams.py", "engine"), ("core/types.py", "engine"),
]
LOOP = ("asyncio/", "uvloop", "selectors")
# Frames (substrings) of moderation's two sides: the output guard's modules and its
# entries in the moderator and the classifier, and the input side's module.
OUTPUT_GUARD = (
    "core/moderation/guard.py", "core/moderation/release.py", "core/moderation/output.py",
    "core/moderation/leak.py", "FilterModerator.guard (", "FilterModerator.output_guard (",
    "FilterModerator._output_guard (", "ScoreWindow.feed",
)
INPUT_CHECKS = ("core/moderation/input.py",)


def stage(frames: list[str]) -> str:
    """The stage one sample's stack (outermost first) is charged to."""
    found = "other"
    for frame in reversed(frames):
        hit = next((name for part, name in PARTS if part in frame), None)
        if hit is not None:
            found = hit
            break
    else:
        if any(part in f for f in frames for part in LOOP):
            found = "event loop"
    if found == "moderation: input checks":
        return _moderation_side(frames)
    return found


def _moderation_side(frames: list[str]) -> str:
    """The side of moderation a sample in its code works for: that of the innermost frame
    that marks one; the input checks if none does."""
    for frame in reversed(frames):
        if any(part in frame for part in OUTPUT_GUARD):
            return "moderation: output guard"
        if any(part in frame for part in INPUT_CHECKS):
            return "moderation: input checks"
    return "moderation: input checks"


def stages(path: Path) -> collections.Counter[str]:
    """Samples per stage in a raw py-spy profile, idle samples (waiting in epoll) left out."""
    counts: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if re.search(r"\b(select|poll|epoll_wait)\b", frames[-1]) and "selectors" in frames[-1]:
            continue
        counts[stage(frames)] += int(count)
    return counts


def table(path: Path, us_per_message: float | None = None) -> str:
    """The stages of ``path`` as text, biggest first."""
    counts = stages(path)
    total = sum(counts.values()) or 1
    lines = [f"{path.name}: {total} samples"]
    for name, count in counts.most_common():
        us = f"  ~{us_per_message * count / total:5.0f} µs/msg" if us_per_message else ""
        lines.append(f"  {name:<28} {100 * count / total:5.1f} %{us}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--us-per-message", type=float)
    args = parser.parse_args()
    print(table(args.profile, args.us_per_message))


if __name__ == "__main__":
    main()

"""``parley audit CONFIG``: read a bot's moderation audit log (and escalations).

Newest first, one line per decision with its local time; ``--user``, ``--channel``,
``--category`` (a finding's kind such as ``terms`` or ``pii``, or a whole label such as
``pii:email``), ``--since`` and ``--until`` (``30m``, ``2h``, ``7d`` ago, or a date
``2026-11-29`` / time ``2026-11-29T20:00``, local unless it names its offset) narrow it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO

from core.config import BotSettings
from core.errors import ParleyError
from core.moderation.moderator import make_state
from core.moderation.state import MemoryState

_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which entries to show; ``None`` leaves a field unfiltered. Times are epoch seconds."""

    user: str | None = None
    channel: str | None = None
    category: str | None = None
    since: float | None = None
    until: float | None = None

    @property
    def active(self) -> bool:
        """Whether anything is filtered at all."""
        return any(v is not None for v in (self.user, self.channel, self.category,
                                           self.since, self.until))

    def matches(self, row: Mapping[str, str]) -> bool:
        """Whether ``row`` (an audit entry) passes every filter set."""
        if self.user is not None and row.get("user") != self.user:
            return False
        if self.channel is not None and row.get("channel") != self.channel:
            return False
        if self.category is not None:
            labels = [label for label in row.get("policy", "").split(",") if label]
            if not any(self.category in (label, label.split(":", 1)[0]) for label in labels):
                return False
        at = entry_time(row)
        if self.since is not None and (at is None or at < self.since):
            return False
        return not (self.until is not None and (at is None or at > self.until))


def parse_when(text: str, now: float | None = None) -> float:
    """Epoch seconds of ``text``: ``90s``/``30m``/``2h``/``7d``/``2w`` ago, or an ISO
    date or date-time (local time unless it carries an offset). ``ValueError`` otherwise.
    """
    ago = _AGO.match(text)
    if ago:
        now = time.time() if now is None else now
        return now - float(ago.group(1)) * _UNIT_SECONDS[ago.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a time ago (30m, 2h, 7d) nor a date or time "
            "(2026-11-29, 2026-11-29T20:00)"
        ) from None
    return moment.timestamp()  # naive: local time, as the printed times are


def entry_time(row: Mapping[str, str]) -> float | None:
    """When an entry was written: its ``ts``, else the milliseconds of its stream id."""
    try:
        return float(row["ts"])
    except (KeyError, ValueError):
        pass
    try:
        return int(row.get("id", "").split("-", 1)[0]) / 1000
    except ValueError:
        return None


def readable_time(at: float | None, *, utc: bool = False) -> str:
    """``2026-11-29 20:13:05`` in local time (or UTC), ``-`` when unknown."""
    if at is None:
        return "-" + " " * 18
    moment = datetime.fromtimestamp(at, UTC if utc else None)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


async def print_audit(
    settings: BotSettings, *, limit: int = 50, escalations: bool = False, as_json: bool = False,
    out: IO[str] | None = None, where: AuditFilter | None = None, utc: bool = False,
) -> int:
    """Print the newest ``limit`` entries that pass ``where``, newest first; returns the
    exit status.
    """
    out = out or sys.stdout
    where = where or AuditFilter()
    state = make_state(settings)
    if isinstance(state, MemoryState):
        print(f"{settings.source}: moderation state is in-process (memory backend "
              f"{settings.memory.backend!r}); it has no audit log to read from outside. "
              "Use [moderation] state = \"redis\".", file=sys.stderr)
        return 1
    read = state.read_escalations if escalations else state.read_audit
    try:
        await state.start()
        # The log is read newest first; with filters, a wider window each time until
        # enough entries pass or the whole log (capped by audit_max_entries) was read.
        window = limit if not where.active else max(limit * 4, 1000)
        while True:
            rows = await read(window)
            chosen = [row for row in rows if where.matches(row)][:limit]
            if len(chosen) >= limit or len(rows) < window or not where.active:
                break
            window *= 4
    except ParleyError as exc:
        print(f"parley audit: {exc}", file=sys.stderr)
        return 1
    finally:
        await state.stop()
    for row in chosen:
        at = entry_time(row)
        if as_json:
            iso = None if at is None else datetime.fromtimestamp(at, UTC).isoformat()
            shown = {**row, "time": iso}
            out.write(json.dumps(shown, ensure_ascii=False) + "\n")
        else:
            out.write(f"{readable_time(at, utc=utc)} {row.get('stage', '-'):6} "
                      f"{row.get('action', '-'):8} {row.get('channel', '-')}/"
                      f"{row.get('user', '-')} {row.get('policy', '-')} "
                      f"{row.get('scores', '')} {row.get('hash', '')}"
                      f"{' degraded=' + row['degraded'] if row.get('degraded') else ''}\n")
    return 0

"""``parley audit CONFIG``: read a bot's moderation audit log (and escalations)."""

from __future__ import annotations

import json
import sys
from typing import IO

from core.config import BotSettings
from core.errors import ParleyError
from core.moderation.moderator import make_state
from core.moderation.state import MemoryState


async def print_audit(
    settings: BotSettings, *, limit: int = 50, escalations: bool = False, as_json: bool = False,
    out: IO[str] | None = None,
) -> int:
    """Print the newest ``limit`` entries, newest first; returns the exit status."""
    out = out or sys.stdout
    state = make_state(settings)
    if isinstance(state, MemoryState):
        print(f"{settings.source}: moderation state is in-process (memory backend "
              f"{settings.memory.backend!r}); it has no audit log to read from outside. "
              "Use [moderation] state = \"redis\".", file=sys.stderr)
        return 1
    try:
        await state.start()
        rows = await (state.read_escalations(limit) if escalations else state.read_audit(limit))
    except ParleyError as exc:
        print(f"parley audit: {exc}", file=sys.stderr)
        return 1
    finally:
        await state.stop()
    for row in rows:
        if as_json:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            out.write(f"{row.get('id', '-'):>18} {row.get('stage', '-'):6} "
                      f"{row.get('action', '-'):8} {row.get('channel', '-')}/"
                      f"{row.get('user', '-')} {row.get('policy', '-')} "
                      f"{row.get('scores', '')} {row.get('hash', '')}"
                      f"{' degraded=' + row['degraded'] if row.get('degraded') else ''}\n")
    return 0

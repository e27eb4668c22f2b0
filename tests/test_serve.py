"""``core.app.serve``: what the serving process does once its adapters run."""

from __future__ import annotations

import gc

from core.app import build_engine, serve
from core.config import parse_settings
from core.engine import Engine


class _Probe:
    """An adapter that finishes at once, noting how many objects were frozen by then."""

    def __init__(self) -> None:
        self.frozen_when_serving = -1

    async def start(self, engine: Engine) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def wait(self) -> None:
        self.frozen_when_serving = gc.get_freeze_count()


def _engine() -> Engine:
    return build_engine(parse_settings({"bot": {"name": "gc"},
                                        "generation": {"backend": "echo"}}))


async def test_a_serving_process_freezes_what_start_up_built() -> None:
    probe = _Probe()
    gc.unfreeze()
    try:
        await serve(_engine(), [probe], freeze_heap=True)
        # Start-up objects (the moderation tables, the engine) are out of the
        # collector's sight before the first message: full collections stay short.
        assert probe.frozen_when_serving > 10_000
    finally:
        gc.unfreeze()


async def test_serve_freezes_nothing_unless_asked() -> None:
    probe = _Probe()
    gc.unfreeze()
    await serve(_engine(), [probe])
    assert probe.frozen_when_serving == 0

"""Blocking work that runs a torch model, off the event loop, on a thread that then ends.

A thread that runs a torch model on CPU keeps an OpenMP thread team for as long as it
lives. While more OpenMP threads live than there are cores, the OpenMP runtime (GNU
libgomp, as in torch's CPU wheels) stops letting idle workers spin between parallel
regions, and the generation manager's thread then pays a wake-up for each of the
hundreds of small regions of a decode step: measured on 2 cores, the batching worker at
one request fell from 35 to 20 tokens/s after a single forward pass had run on the event
loop's executor thread (which lives on). Model work other than the manager's own (the
start-up self-check, the FAQ plugin's embeddings) therefore runs here, not through
``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


async def in_own_thread(fn: Callable[..., _T], *args: Any, name: str = "parley-model") -> _T:
    """``fn(*args)`` on a new thread that ends when it returns; its result or exception."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():  # the awaiting task went away
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done

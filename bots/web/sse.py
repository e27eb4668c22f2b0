"""Server-Sent Events helpers: the stream's response, and keep-alive while a reply waits.

A request can wait in the generator's queue for a while before its first token. The
stream is not started until the reply begins, so that a failure before it (busy, memory
down) is still an HTTP status; but past ``interval`` seconds of waiting it is started
and a comment line is sent every ``interval`` seconds, so that proxies and browsers do
not give up on a silent connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from core.types import ReplyEvent, ReplyKind

KEEPALIVE = b": keep-alive\n\n"


async def start_stream(request: web.Request) -> web.StreamResponse:
    """A prepared ``text/event-stream`` response."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies must not hold the deltas back
        }
    )
    await response.prepare(request)
    return response


async def first_event(
    request: web.Request, events: AsyncIterator[ReplyEvent], interval: float
) -> tuple[ReplyEvent, web.StreamResponse | None]:
    """The reply's first event other than TYPING, and the stream if waiting for it
    started one (then keep-alive comments have been sent on it)."""
    response: web.StreamResponse | None = None
    while True:
        step = asyncio.ensure_future(anext(events))
        try:
            while not (await asyncio.wait({step}, timeout=interval))[0]:
                if response is None:
                    response = await start_stream(request)
                await response.write(KEEPALIVE)
        finally:
            if not step.done():
                # The client went while waiting: stop the step before the caller closes
                # the stream (an async generator cannot be closed while it runs).
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
        event = step.result()
        if event.kind is not ReplyKind.TYPING:
            return event, response

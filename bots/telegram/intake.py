"""Updates in, one chat at a time: per-chat order, update-id dedupe, outcome per update.

Each update becomes a task that waits for the chat's previous update, so replies in one
chat go out in the order the messages came, while chats run concurrently. An update id
seen before is not handled again: a redelivery of an update still in progress waits for
it, one already handled succeeds at once, and one that failed is handled afresh (that
is how a webhook's redelivery after a failure gets its answer).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from telegram import Update

log = logging.getLogger(__name__)

# Update ids remembered as handled: far more than Telegram keeps for redelivery.
DONE_WINDOW = 10_000


class Intake:
    """Runs ``handler`` for each update; see the module docstring."""

    def __init__(self, handler: Callable[[Update], Awaitable[None]],
                 window: int = DONE_WINDOW) -> None:
        self._handler = handler
        self._window = window
        self._done: OrderedDict[int, None] = OrderedDict()
        self._running: dict[int, asyncio.Task[None]] = {}
        self._tails: dict[int | None, asyncio.Task[None]] = {}

    def submit(self, update: Update) -> asyncio.Future[None]:
        """Handle ``update`` after its chat's earlier ones; its outcome."""
        update_id = update.update_id
        if update_id in self._done:
            log.debug("telegram: update %d was handled already", update_id)
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        running = self._running.get(update_id)
        if running is not None:
            return running
        chat = update.effective_chat.id if update.effective_chat is not None else None
        previous = self._tails.get(chat)
        task = asyncio.create_task(self._run(update, previous), name=f"telegram-{update_id}")
        self._running[update_id] = self._tails[chat] = task
        task.add_done_callback(lambda t: self._finished(update_id, chat, t))
        return task

    async def _run(self, update: Update, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            # Its failure is its own (logged there); this one goes next either way.
            await asyncio.wait([previous])
        await self._handler(update)

    def _finished(self, update_id: int, chat: int | None, task: asyncio.Task[None]) -> None:
        self._running.pop(update_id, None)
        if self._tails.get(chat) is task:
            del self._tails[chat]
        if task.cancelled() or task.exception() is not None:
            return  # not done: a redelivery is handled afresh
        self._done[update_id] = None
        while len(self._done) > self._window:
            self._done.popitem(last=False)

    async def drain(self, grace: float) -> None:
        """Let updates in progress finish for up to ``grace`` s, then cancel the rest."""
        tasks = list(self._running.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

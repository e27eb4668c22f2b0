"""Long polling that confirms an update only once it was handled.

Telegram confirms updates by offset: a ``getUpdates`` call with ``offset=N`` drops
every update below N for good. python-telegram-bot's ``Updater`` passes the id after
the last update it *fetched* on its very next call, so an update still being answered
is already confirmed: a process that dies then loses it. Here the offset never passes
the oldest update not yet handled (its outcome known, success or failure). A process
that dies mid-reply gets the update again after its restart; the price is that, while
an update is in progress, Telegram answers ``getUpdates`` at once (it still has that
update), so polling turns short: after a poll that brought nothing new the poller waits
for an update to finish, or for :data:`BUSY_INTERVAL`, before polling again.

Updates that finish out of order (chats run concurrently) are confirmed together once
the older ones finish; a later poll that brings them again skips them. At stop, the
handled ones are confirmed with one last call, as PTB does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta

from telegram import Bot, Update
from telegram.error import RetryAfter, TelegramError

log = logging.getLogger(__name__)

# While updates are in progress: how long a poll that brought nothing new waits.
BUSY_INTERVAL = 0.25
# After a failed poll: the first wait, doubled per failure up to MAX_BACKOFF.
BACKOFF = 0.5
MAX_BACKOFF = 30.0


class Poller:
    """Fetches updates for ``submit`` and confirms each once its outcome is known."""

    def __init__(
        self,
        bot: Bot,
        submit: Callable[[Update], asyncio.Future[None]],
        *,
        timeout: float,
        allowed_updates: Sequence[str],
        on_error: Callable[[TelegramError], None],
    ) -> None:
        self._bot = bot
        self._submit = submit
        self._timeout = timeout
        self._allowed = list(allowed_updates)
        self._on_error = on_error
        self._next = 0  # the id after the newest update fetched (0: none yet)
        self._confirmed = 0  # the offset Telegram was last given
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def offset(self) -> int:
        """What may be confirmed now: the oldest update in progress, else all fetched."""
        return min(self._pending, default=self._next)

    def start(self) -> None:
        """Start polling in the background. Idempotent."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="telegram-polling")

    async def stop(self) -> None:
        """Stop fetching (a poll in flight is abandoned: it confirms nothing)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def confirm(self) -> None:
        """Confirm what was handled since the last poll (after stop, before shutdown)."""
        if self.offset <= self._confirmed:
            return
        try:
            await self._bot.get_updates(offset=self.offset, timeout=0, limit=1,
                                        allowed_updates=self._allowed)
            self._confirmed = self.offset
        except TelegramError as exc:
            log.warning("telegram: could not confirm the handled updates (%s); they may "
                        "come again after a restart", exc)

    async def _run(self) -> None:
        failures = 0
        while True:
            offset = self.offset
            try:
                updates = await self._bot.get_updates(
                    offset=offset or None, timeout=timedelta(seconds=self._timeout),
                    allowed_updates=self._allowed)
            except RetryAfter as exc:
                self._on_error(exc)
                await asyncio.sleep(_seconds(exc.retry_after))
                continue
            except TelegramError as exc:
                self._on_error(exc)
                await asyncio.sleep(min(MAX_BACKOFF, BACKOFF * 2 ** failures))
                failures += 1
                continue
            failures = 0
            self._confirmed = max(self._confirmed, offset)
            fresh = [u for u in updates if u.update_id >= self._next]
            for update in fresh:
                self._track(update)
            if fresh:
                self._next = fresh[-1].update_id + 1
            elif self._pending:
                # Telegram answers at once while it holds an update in progress.
                await asyncio.wait(list(self._pending.values()), timeout=BUSY_INTERVAL,
                                   return_when=asyncio.FIRST_COMPLETED)

    def _track(self, update: Update) -> None:
        update_id = update.update_id
        outcome = self._submit(update)
        if outcome.done():
            return
        self._pending[update_id] = outcome
        outcome.add_done_callback(lambda done: self._finished(update_id, done))

    def _finished(self, update_id: int, outcome: asyncio.Future[None]) -> None:
        # Failure or success, the handler logged and counted it: done either way. One
        # cancelled at stop was not handled: it stays, and is not confirmed.
        if outcome.cancelled():
            return
        self._pending.pop(update_id, None)
        if outcome.exception() is not None:
            log.warning("telegram: update %d failed: %r", update_id, outcome.exception())


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)

"""The web widget's own stores of user data: the reply log and feedback, together.

The widget's hub serves from them; ``parley forget`` and ``parley feedback`` open them
without the rest of the adapter (:class:`core.forget.KeepsUserData`,
:class:`core.feedback.KeepsFeedback`). Both live where memory lives: in Redis
with ``[memory] backend = "redis"``, in this process otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote

from bots.web.feedback import FeedbackStore, RedisFeedbackStore
from bots.web.resume import MemoryReplyLog, RedisReplyLog, ReplyLog
from bots.web.settings import WidgetFields
from core.config import BotSettings
from core.feedback import Rated
from core.lifecycle import ServiceBase
from core.memory.base import UserRef
from core.redis_client import RedisHub, key_part
from core.types import ConversationKey

CHANNEL = "web"


def ref_of(conversation_id: str) -> str:
    """A web conversation's reference in keys, as memory spells it."""
    return f"{CHANNEL}:{key_part(conversation_id)}"


class WidgetStores(ServiceBase):
    """The reply log and the feedback store of one bot's widget."""

    def __init__(self, settings: BotSettings, config: WidgetFields,
                 redis: RedisHub | None = None) -> None:
        self.log: ReplyLog
        self.feedback: FeedbackStore
        self.bot = bot = settings.bot.name
        if settings.memory.backend == "redis":
            self.log = RedisReplyLog(settings.memory, bot, ttl=config.resume_ttl,
                                     cap=config.resume_events, source=settings.source,
                                     redis=redis)
            self.feedback = RedisFeedbackStore(settings.memory, bot, source=settings.source)
        else:
            self.log = MemoryReplyLog(ttl=config.resume_ttl, cap=config.resume_events)
            self.feedback = FeedbackStore()

    @property
    def out_of_process(self) -> bool:
        """Whether another process (``parley forget``) can reach them."""
        return isinstance(self.log, RedisReplyLog)

    async def _start(self) -> None:
        await self.log.start()
        try:
            await self.feedback.start()
        except BaseException:
            await self.log.stop()
            raise

    async def _stop(self) -> None:
        try:
            await self.feedback.stop()
        finally:
            await self.log.stop()

    async def all_feedback(self, since: float | None = None) -> list[Rated]:
        """Every rating kept (given at ``since`` or later), for ``parley feedback``."""
        return sorted((Rated(self.bot, CHANNEL, unquote(ref.partition(":")[2]), f.message_id,
                             f.user_id, f.rating, f.comment, f.prompt, f.reply, f.at)
                       for ref, f in await self.feedback.everything(since)),
                      key=lambda r: r.at)

    async def forget_user(self, user: UserRef, conversations: Sequence[ConversationKey]) -> int:
        """A forget hook: the reply logs and feedback of the web conversations the user
        took part in, and the feedback they gave anywhere; how many records went."""
        if user.channel != CHANNEL:
            return 0
        refs = [ref_of(key.conversation_id) for key in conversations if key.channel == CHANNEL]
        return await self.log.drop(refs) + await self.feedback.forget(user.user_id, refs)

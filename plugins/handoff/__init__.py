"""Handoff to people: the bot steps aside in a conversation and relays it to agents.

    /human          (user) pauses the bot here and calls an agent
    /bot            (user) gives the conversation back to the bot
    /reply REF TEXT (agent, in the agents' conversation) answers the user
    /release REF    (agent) gives the conversation back to the bot

Also triggered by repeated FAQ misses (``faq.miss``), by moderation escalating a message
(``moderation.escalate``, which the engine emits) and by an angry message. Agents are
notified in a conversation of any channel an adapter serves (``agents_channel`` and
``agents_conversation``) and/or by a webhook (POST, JSON). While paused, every message of
the user is relayed to the agents and the bot stays silent, storing nothing. The pause
lives in the bot's store, so it survives restarts and holds on every front end.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from core.plugin_services import DeliveryError
from core.plugins import SILENT, CommandContext, CommandError, Plugin, PreHookResult, Reply
from core.redis_client import key_part
from core.types import ConversationKey, IncomingMessage

NAME = "handoff"


class Config(BaseModel):
    """``[plugins.handoff]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    agents_channel: str | None = None
    agents_conversation: str | None = None
    webhook: str | None = None  # set it from ${ENV}; receives {"event", "conversation", ...}
    after_faq_misses: int = Field(default=2, ge=0)  # 0: never
    angry_words: list[str] = ["useless", "ridiculous", "terrible", "worst", "angry",
                              "furious", "scam", "idiot", "rubbish", "unacceptable"]
    angry: bool = True
    on_escalation: bool = True  # moderation's "escalate" hands the conversation over
    handed_over: str = ("I've asked a colleague to take over; they will answer here. "
                        "Type /bot to come back to me.")
    back: str = "I'm back. How can I help?"
    unavailable: str = ("Sorry, I can't reach a colleague right now. Please try again in "
                        "a little while.")
    timeout: float = Field(default=5.0, gt=0.0)


def ref_of(key: ConversationKey) -> str:
    """How agents name a conversation: ``channel:conversation``."""
    return f"{key_part(key.channel)}:{key_part(key.conversation_id)}"


def setup(registry: Plugin, config: Config) -> None:
    """Register the commands, the relay and the triggers."""
    if config.agents_channel is None and config.webhook is None:
        raise ValueError("set agents_channel (+ agents_conversation) or webhook")
    registry.uses_pauses()
    session: list[aiohttp.ClientSession] = []

    def agents(bot: str) -> ConversationKey | None:
        if config.agents_channel is None:
            return None
        return ConversationKey(bot, config.agents_channel,
                               config.agents_conversation or "agents")

    async def notify(bot: str, event: str, key: ConversationKey, text: str) -> None:
        target = agents(bot)
        if target is not None:
            await registry.send(target, f"[{ref_of(key)}] {text}")
        if config.webhook is not None:
            if not session:
                session.append(aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=config.timeout)))
            async with session[0].post(config.webhook, json={
                    "event": event, "bot": bot, "conversation": ref_of(key),
                    "text": text}) as response:
                response.raise_for_status()

    async def hand_over(message: IncomingMessage, why: str) -> bool:
        """Pause the conversation and tell the agents; if they cannot be told, undo the
        pause (nobody would answer) and say so: False."""
        await registry.pause(message.key, why)
        try:
            await notify(message.bot, "handoff", message.key,
                         f"{why}: user {message.user_id} needs a human. Last message: "
                         f"{message.text}\nAnswer with /reply {ref_of(message.key)} TEXT")
        except (DeliveryError, aiohttp.ClientError, TimeoutError) as exc:
            await registry.resume(message.key)
            registry.registry.failed(NAME, "notifying the agents", exc)
            return False
        return True

    async def human(ctx: CommandContext) -> str:
        if await registry.paused(ctx.key):
            return "A colleague has been called already; they will answer here."
        return config.handed_over if await hand_over(ctx.message, "asked for a human") \
            else config.unavailable

    async def bot_command(ctx: CommandContext) -> str:
        if await registry.resume(ctx.key):
            await notify(ctx.message.bot, "resumed", ctx.key, "the user went back to the bot")
            await registry.conversation_state(ctx.key).clear()
        return config.back

    def from_agents(ctx: CommandContext) -> None:
        if ctx.key != agents(ctx.message.bot):
            raise CommandError("Only agents can do that, in the agents' conversation.")

    def parse_ref(ctx: CommandContext, usage: str) -> ConversationKey:
        if not ctx.argv or ":" not in ctx.argv[0]:
            raise CommandError(f"usage: {usage}")
        channel, _, conversation = ctx.argv[0].partition(":")
        return ConversationKey(ctx.message.bot, unquote(channel), unquote(conversation))

    async def reply(ctx: CommandContext) -> str:
        from_agents(ctx)
        key = parse_ref(ctx, "/reply CHANNEL:CONVERSATION TEXT")
        text = ctx.args.split(None, 1)[1] if len(ctx.args.split(None, 1)) > 1 else ""
        if not text:
            raise CommandError("usage: /reply CHANNEL:CONVERSATION TEXT")
        await registry.send(key, text)
        return f"Sent to {ref_of(key)}."

    async def release(ctx: CommandContext) -> str:
        from_agents(ctx)
        key = parse_ref(ctx, "/release CHANNEL:CONVERSATION")
        was = await registry.resume(key)
        if was:
            await registry.send(key, config.back)
        return f"{ref_of(key)} is back with the bot." if was else f"{ref_of(key)} was not paused."

    async def relay(message: IncomingMessage) -> PreHookResult:
        if message.key == agents(message.bot):
            return None
        if await registry.paused(message.key):
            await notify(message.bot, "message", message.key,
                         f"{message.user_id}: {message.text}")
            return SILENT
        if config.angry and _angry(message.text, config.angry_words):
            if await hand_over(message, "the user seems upset"):
                return Reply(config.handed_over, store=False)
        return None

    async def faq_miss(message: IncomingMessage, data: object) -> None:
        if config.after_faq_misses <= 0:
            return
        misses = await registry.conversation_state(message.key).incr("faq_misses")
        if misses >= config.after_faq_misses and not await registry.paused(message.key):
            await hand_over(message, f"{misses} questions the FAQ could not answer")

    async def escalated(message: IncomingMessage, data: object) -> None:
        if config.on_escalation and not await registry.paused(message.key):
            await hand_over(message, "moderation escalated the conversation")

    async def stop() -> None:
        if session:
            await session.pop().close()

    registry.add_command("human", human, "talk to a person")
    registry.add_command("bot", bot_command, "come back to the bot")
    registry.add_command("reply", reply, "(agents) answer a user", usage="REF TEXT")
    registry.add_command("release", release, "(agents) give a conversation back to the bot",
                         usage="REF")
    registry.add_pre_hook(relay, when_paused=True)
    registry.on("faq.miss", faq_miss)
    registry.on("moderation.escalate", escalated)
    registry.on_stop(stop)


def _angry(text: str, words: list[str]) -> bool:
    lowered = text.lower()
    letters = [c for c in text if c.isalpha()]
    shouting = len(letters) >= 12 and sum(c.isupper() for c in letters) / len(letters) > 0.8
    return shouting or "!!!" in text or any(
        re.search(rf"\b{re.escape(w)}\b", lowered) for w in words)

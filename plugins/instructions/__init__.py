"""Custom instructions, as in ChatGPT: what the bot should know about a user and how to answer.

    /instructions I'm a nurse on night shifts; answer briefly, in Dutch.
    /instructions            shows them;   /instructions clear   deletes them
    /link                    gives a one-time code; /link CODE on another channel links
                             the two accounts (instructions and /forget then cover both)

Instructions are kept per user (and shared by linked accounts), capped in length,
checked by the bot's moderation like any message, and go into every later prompt of
that user as the user's own words, never as system text.
"""

from __future__ import annotations

import secrets

from pydantic import BaseModel, ConfigDict, Field

from core.plugins import AddContext, CommandContext, CommandError, Plugin
from core.types import IncomingMessage

NAME = "instructions"



class Config(BaseModel):
    """``[plugins.instructions]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_chars: int = Field(default=600, ge=20, le=4000)
    code_ttl: float = Field(default=600.0, gt=0.0)  # seconds a /link code is valid
    preamble: str = "About me, and how I'd like you to answer:"


def setup(registry: Plugin, config: Config) -> None:
    """Register /instructions, /link and the context provider."""
    storage = registry.storage
    codes = storage.bucket("link-codes", ttl=config.code_ttl)

    async def find(channel: str, user_id: str) -> str | None:
        for who in await registry.services.accounts.linked((channel, user_id)):
            text = await storage.user(*who).get("text")
            if text:
                return str(text)
        return None

    async def instructions(ctx: CommandContext) -> str:
        me = storage.user(ctx.message.channel, ctx.message.user_id)
        if not ctx.args:
            current = await find(ctx.message.channel, ctx.message.user_id)
            return (f"Your instructions: {current}" if current else
                    "You have no instructions. Set them with /instructions TEXT.")
        if ctx.args.lower() in ("clear", "delete", "reset"):
            for who in await registry.services.accounts.linked(
                    (ctx.message.channel, ctx.message.user_id)):
                await storage.user(*who).delete("text")
            return "Your instructions are deleted."
        if len(ctx.args) > config.max_chars:
            raise CommandError(f"Instructions can be at most {config.max_chars} characters "
                               f"(these have {len(ctx.args)}).")
        # The engine has put the arguments through moderation already (refused, or
        # masked: ctx.args is what moderation let through).
        await me.set("text", ctx.args)
        return "Saved. I'll keep them in mind in every conversation with you."

    async def link(ctx: CommandContext) -> str:
        me = (ctx.message.channel, ctx.message.user_id)
        if not ctx.argv:
            # Six digits: typed by hand, never mistaken for a phone number or a word by
            # moderation; guessing is bounded by one use, the TTL and flood control.
            code = f"{secrets.randbelow(1000):03d}-{secrets.randbelow(1000):03d}"
            await codes.set(code, list(me))
            minutes = max(1, round(config.code_ttl / 60))
            return (f"Your link code is {code}. Send /link {code} to me from your other "
                    f"account within {minutes} minute(s).")
        code = ctx.argv[0]
        other = await codes.get(code)
        if other is None:
            raise CommandError("That code is unknown or has expired. Ask for a new one "
                               "with /link on your other account.")
        await codes.delete(code)  # one use only
        other_id = (str(other[0]), str(other[1]))
        if other_id == me:
            raise CommandError("That code is from this very account.")
        await registry.services.accounts.link(me, other_id)
        return f"Linked: this account and your {other_id[0]} account are now one."

    async def context(message: IncomingMessage) -> AddContext | None:
        text = await find(message.channel, message.user_id)
        return AddContext(f"{config.preamble}\n{text}", role="user") if text else None

    registry.add_command("instructions", instructions,
                         "what I should know about you and how to answer",
                         usage="[TEXT | clear]")
    registry.add_command("link", link, "link your accounts on two channels", usage="[CODE]")
    registry.add_context_provider(context)

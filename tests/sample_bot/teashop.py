"""A bot author's own plugin, kept next to their bot file (``bot.toml``), not in Parley.

It is what docs/plugins.md walks through: a settings model, commands with arguments,
per-user storage, a pre-hook answering directly and a context provider. The tests in
``tests/test_plugins_sample.py`` drive it through ``core.testing.ChatHarness``, as its
author would.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from core.plugins import AddContext, CommandContext, CommandError, Plugin, Reply
from core.types import IncomingMessage

NAME = "teashop"


class Config(BaseModel):
    """``[plugins.teashop]``: the menu (prices in euros) and today's special."""

    model_config = ConfigDict(extra="forbid")

    menu: dict[str, float] = Field(min_length=1)
    special: str = ""
    max_cups: int = Field(default=10, ge=1)


def setup(registry: Plugin, config: Config) -> None:
    """Register /order, /basket, the menu answer and the special."""

    async def order(ctx: CommandContext) -> str:
        if not ctx.argv:
            raise CommandError("usage: /order TEA [CUPS]")
        tea = ctx.argv[0].lower()
        if tea not in config.menu:
            raise CommandError(f"We have no {tea}. Try: {', '.join(sorted(config.menu))}.")
        cups = int(ctx.argv[1]) if len(ctx.argv) > 1 and ctx.argv[1].isdigit() else 1
        if not 1 <= cups <= config.max_cups:
            raise CommandError(f"Between 1 and {config.max_cups} cups, please.")
        basket = registry.storage.user(ctx.message.channel, ctx.message.user_id)
        total = await basket.incr(tea, cups)
        return f"Added {cups} x {tea}. You have {total} in your basket."

    async def show_basket(ctx: CommandContext) -> str:
        items = await registry.storage.user(ctx.message.channel, ctx.message.user_id).items()
        if not items:
            return "Your basket is empty."
        lines = [f"{cups} x {tea}: {cups * config.menu[tea]:.2f} EUR"
                 for tea, cups in sorted(items.items())]
        total = sum(cups * config.menu[tea] for tea, cups in items.items())
        return "\n".join([*lines, f"Total: {total:.2f} EUR"])

    async def menu(message: IncomingMessage) -> Reply | None:
        if "menu" not in message.text.lower():
            return None
        listed = ", ".join(f"{tea} ({price:.2f} EUR)" for tea, price in
                           sorted(config.menu.items()))
        return Reply(f"Today we serve: {listed}.", metadata={"source": "teashop-menu"})

    async def special(message: IncomingMessage) -> AddContext | None:
        return AddContext(f"Today's special: {config.special}.") if config.special else None

    registry.add_command("order", order, "put tea in your basket", usage="TEA [CUPS]")
    registry.add_command("basket", show_basket, "what is in your basket")
    registry.add_pre_hook(menu)
    registry.add_context_provider(special, max_tokens=40)

"""A bot author's tests of their own plugin (tests/sample_bot/teashop.py), written only
against the public test kit: ``core.testing``."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.testing import ChatHarness, ScriptedGenerator

BOT = Path(__file__).resolve().parent / "sample_bot" / "bot.toml"


async def test_ordering_fills_the_users_own_basket() -> None:
    async with ChatHarness.from_file(BOT) as bot:
        assert (await bot.send("/order sencha 2", user="ann")).text == (
            "Added 2 x sencha. You have 2 in your basket.")
        await bot.send("/order rooibos", user="ann")
        assert (await bot.send("/basket", user="ann")).text == (
            "1 x rooibos: 2.50 EUR\n2 x sencha: 7.00 EUR\nTotal: 9.50 EUR")
        assert (await bot.send("/basket", user="bob")).text == "Your basket is empty."


async def test_bad_orders_get_the_usage_or_the_menu() -> None:
    async with ChatHarness.from_file(BOT) as bot:
        assert (await bot.send("/order")).text == "usage: /order TEA [CUPS]"
        assert (await bot.send("/order coffee")).text == (
            "We have no coffee. Try: assam, rooibos, sencha.")
        assert (await bot.send("/order assam 50")).text == "Between 1 and 10 cups, please."
        assert "/order TEA [CUPS] - put tea in your basket" in (await bot.send("/help")).text


async def test_the_menu_is_answered_directly_and_the_special_reaches_the_model() -> None:
    generator = ScriptedGenerator(["Try the iced sencha!"])
    async with ChatHarness.from_file(BOT, generator=generator) as bot:
        menu = await bot.send("what's on the menu?")
        assert menu.text == ("Today we serve: assam (3.00 EUR), rooibos (2.50 EUR), "
                             "sencha (3.50 EUR).")
        assert menu.metadata == {"source": "teashop-menu"}
        assert (await bot.send("anything cold?")).text == "Try the iced sencha!"
        assert "iced sencha with mint" in generator.requests[-1].messages[0].content


async def test_the_echo_generator_needs_no_model() -> None:
    async with ChatHarness.from_file(BOT) as bot:
        reply = await bot.send("hello tea")
        assert (reply.kind, reply.text) == ("final", "hello tea")


def test_a_wrong_menu_is_refused_at_start_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bot.toml"
    (tmp_path / "teashop.py").write_text((BOT.parent / "teashop.py").read_text())
    bad.write_text(BOT.read_text().replace("sencha = 3.5", 'sencha = "cheap"'))
    with pytest.raises(ConfigError, match=r"bot.toml: plugins.teashop.menu.sencha: "):
        ChatHarness.from_file(bad)

"""Plugin API v2 through the chat harness: loading, config, commands, hooks, services."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest

from core.app import build_engine
from core.config import load_settings
from core.errors import ConfigError
from core.plugin_services import DeliveryError
from core.testing import ChatHarness, ScriptedGenerator
from core.types import ConversationKey

PLUGIN = '''
import asyncio
from pydantic import BaseModel
from core.plugins import SILENT, AddContext, CommandError, Reply

NAME = "shop"


class Config(BaseModel):
    model_config = {"extra": "forbid"}
    greeting: str
    faq_answer: str = "We open at 9."


def setup(registry, config):
    events = []
    registry.events = events

    async def hello(ctx):
        return f"{config.greeting}, {ctx.message.user_id}! args={list(ctx.argv)}"

    async def ban(ctx):
        if not ctx.argv:
            raise CommandError("usage: /ban USER")
        return f"banned {ctx.argv[0]}"

    async def boom(ctx):
        raise RuntimeError("the shop plugin broke")

    async def slow(ctx):
        await asyncio.sleep(30)
        return "never"

    async def count(ctx):
        bucket = registry.storage.user(ctx.message.channel, ctx.message.user_id)
        return str(await bucket.incr("count"))

    async def tell(ctx):
        await registry.send(ctx.key, "a message of my own")
        return "sent"

    async def pause(ctx):
        await registry.pause(ctx.key, "testing")
        return "paused"

    async def resume(ctx):
        return "resumed" if await registry.resume(ctx.key) else "was not paused"

    registry.add_command("hello", hello, "say hello", usage="[words]")
    registry.add_command("ban", ban, "ban a user", usage="USER", admin=True)
    registry.add_command("boom", boom)
    registry.add_command("slow", slow)
    registry.add_command("count", count)
    registry.add_command("tell", tell)
    registry.add_command("pause", pause)
    registry.add_command("resume", resume)

    async def pre(message):
        if "hours" in message.text:
            return Reply(config.faq_answer, metadata={"faq_entry": "hours"})
        if "secret" in message.text:
            return Reply("not kept", store=False)
        if "shh" in message.text:
            return SILENT
        if "price" in message.text:
            return AddContext("PRICES: tea 3 EUR")
        return None

    async def while_paused(message):
        events.append(("paused-relay", message.text))
        return None

    async def post(exchange):
        events.append(("post", exchange.message.text, exchange.reply))

    async def about_me(message):
        return AddContext("I like short answers. " * 3, role="user")

    async def long_context(message):
        return "word " * 400

    registry.add_pre_hook(pre)
    registry.add_pre_hook(while_paused, when_paused=True)
    registry.add_post_hook(post)
    registry.add_context_provider(about_me)
    registry.add_context_provider(long_context, max_tokens=20)

    async def start():
        events.append(("start",))

    async def stop():
        events.append(("stop",))

    async def forever():
        await asyncio.sleep(3600)

    registry.on_start(start)
    registry.on_start(lambda: _spawn(registry, forever()))
    registry.on_stop(stop)


async def _spawn(registry, coro):
    registry.spawn(coro, "forever")
'''


def write_bot(tmp_path: Path, plugins: str, *, plugin_file: str = "shop.py",
              plugin_code: str = PLUGIN, extra: str = "") -> Path:
    (tmp_path / plugin_file).write_text(plugin_code, encoding="utf-8")
    bot = tmp_path / "bot.toml"
    bot.write_text(textwrap.dedent(f"""\
        [bot]
        name = "tbot"
        [generation]
        backend = "echo"
        [plugins]
        {plugins}
        {extra}
        """), encoding="utf-8")
    return bot


SHOP = 'modules = ["shop.py"]\nadmins = {test = ["boss"]}\n[plugins.shop]\ngreeting = "Hi"'


async def turns(bot: ChatHarness, user: str = "u1") -> list[tuple[str, str]]:
    key = ConversationKey(bot.engine.name, bot.channel, user)
    snapshot = await bot.engine.memory.load(key, user)
    return [(t.role, t.text) for t in snapshot.turns]


async def test_a_plugin_file_next_to_the_bot_loads_with_its_own_table(tmp_path: Path) -> None:
    async with ChatHarness.from_file(write_bot(tmp_path, SHOP)) as bot:
        reply = await bot.send('/hello "big world" again', user="ann")
        assert (reply.kind, reply.code) == ("notice", "command")
        assert reply.text == "Hi, ann! args=['big world', 'again']"
        assert bot.engine.plugins.plugin_names == ["shop"]


def test_a_plugin_table_is_validated_by_the_plugin_with_file_and_key(tmp_path: Path) -> None:
    bot = write_bot(tmp_path, 'modules = ["shop.py"]\n[plugins.shop]\ngreetin = "Hi"')
    with pytest.raises(ConfigError) as info:
        build_engine(load_settings(bot))
    message = str(info.value)
    assert f"{bot}: plugins.shop.greeting: required key is missing" in message
    assert f"{bot}: plugins.shop.greetin: unknown key" in message


@pytest.mark.parametrize(
    ("plugins", "problem"),
    [
        ('modules = ["nowhere.py"]', "plugins.modules: 'nowhere.py': no such module"),
        ('modules = ["shop.py"]\n[plugins.shop]\ngreeting = "Hi"\n[plugins.other]\nx = 1',
         "plugins.other: no plugin named 'other' is loaded"),
        ('modules = ["shop.py"]\n[plugins.shop]\ngreeting = 3',
         "plugins.shop.greeting: Input should be a valid string"),
        ('modules = ["shop.py"]\nshop = 3', "plugins.shop must be a table"),
    ],
)
def test_a_wrong_plugin_config_stops_start_up_naming_file_and_key(
    tmp_path: Path, plugins: str, problem: str
) -> None:
    bot = write_bot(tmp_path, plugins)
    with pytest.raises(ConfigError) as info:
        build_engine(load_settings(bot))
    assert str(bot) in str(info.value)
    assert problem in str(info.value)


def test_a_plugin_that_fails_to_load_stops_start_up_with_its_name_and_reason(
    tmp_path: Path,
) -> None:
    broken = "def setup(registry, config):\n    raise RuntimeError('no licence key')\n"
    bot = write_bot(tmp_path, 'modules = ["broken.py"]', plugin_file="broken.py",
                    plugin_code=broken)
    with pytest.raises(ConfigError, match=r"plugins\.broken: setup failed: RuntimeError: "
                                          r"no licence key"):
        build_engine(load_settings(bot))
    bad_import = "import does_not_exist_anywhere\n"
    bot = write_bot(tmp_path, 'modules = ["bad.py"]', plugin_file="bad.py",
                    plugin_code=bad_import)
    with pytest.raises(ConfigError, match=r"'bad.py': cannot import .*does_not_exist"):
        build_engine(load_settings(bot))


async def test_a_dotted_module_in_the_bots_folder_loads_without_pythonpath(
    tmp_path: Path,
) -> None:
    package = tmp_path / "mybot"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "plugin.py").write_text(
        "async def hours(ctx):\n    return 'We are open 9-17.'\n\n"
        "def setup(registry):\n    registry.add_command('hours', hours, 'opening hours')\n",
        encoding="utf-8")
    bot = write_bot(tmp_path, 'modules = ["mybot.plugin"]', plugin_file="unused.py")
    async with ChatHarness.from_file(bot) as chat:
        assert (await chat.send("/hours")).text == "We are open 9-17."
        assert chat.engine.plugins.plugin_names == ["plugin"]


async def test_commands_have_help_usage_and_admins_per_channel(tmp_path: Path) -> None:
    async with ChatHarness.from_file(write_bot(tmp_path, SHOP)) as bot:
        help_text = (await bot.send("/help")).text
        assert "/hello [words] - say hello" in help_text
        assert "/ban" not in help_text  # admin commands are listed to admins only
        assert "/ban USER - ban a user" in (await bot.send("/help", user="boss")).text
        refused = await bot.send("/ban mallory", user="ann")
        assert (refused.code, refused.text) == ("not_admin",
                                                "Sorry, /ban is for this channel's admins.")
        assert (await bot.send("/ban mallory", user="boss")).text == "banned mallory"
        assert (await bot.send("/ban", user="boss")).text == "usage: /ban USER"
        # Admins are per channel: the same id elsewhere is nobody special.
        assert (await bot.send("/ban x", user="boss", channel="web")).code == "not_admin"


async def test_an_unknown_command_is_answered_without_the_model(tmp_path: Path) -> None:
    generator = ScriptedGenerator(["from the model"])
    async with ChatHarness.from_file(write_bot(tmp_path, SHOP), generator=generator) as bot:
        reply = await bot.send("/frobnicate now")
        assert (reply.kind, reply.code, reply.text) == (
            "notice", "unknown_command", "unknown command, try /help")
        assert generator.requests == []
        # Something that merely starts with a slash is a message for the model.
        assert (await bot.send("/usr/bin is full, help")).text == "from the model"


async def test_pre_hooks_answer_store_or_not_add_context_or_stay_silent(
    tmp_path: Path,
) -> None:
    generator = ScriptedGenerator(["model reply"])
    async with ChatHarness.from_file(write_bot(tmp_path, SHOP), generator=generator) as bot:
        hours = await bot.send("what are your hours?")
        assert (hours.kind, hours.text) == ("final", "We open at 9.")
        assert hours.metadata == {"faq_entry": "hours"}
        assert await turns(bot) == [("user", "what are your hours?"),
                                    ("assistant", "We open at 9.")]
        assert (await bot.send("tell me a secret")).text == "not kept"
        silent = await bot.send("shh")
        assert (silent.kind, silent.code, silent.text) == ("notice", "silent", "")
        assert len(await turns(bot)) == 2  # neither the secret nor the silence is stored
        assert (await bot.send("what is the price of tea?")).text == "model reply"
        request = generator.requests[-1]
        assert "PRICES: tea 3 EUR" in request.messages[0].content
        # The user's own words go in as a user turn, never as system text.
        assert request.messages[1].role == "user"
        assert request.messages[1].content.startswith("I like short answers.")
        assert "I like short answers" not in request.messages[0].content
        # A provider's text is cut to its own cap (20 tokens, about 80 characters).
        assert "word word" in request.messages[0].content
        assert request.messages[0].content.count("word") <= 20


async def test_context_stays_within_the_bots_budget(tmp_path: Path) -> None:
    generator = ScriptedGenerator(["ok"])
    bot_file = write_bot(tmp_path, SHOP.replace("admins", "context_tokens = 10\nadmins"))
    async with ChatHarness.from_file(bot_file, generator=generator) as bot:
        await bot.send("what is the price of tea?")
        request = generator.requests[-1]
        assert "PRICES: tea 3 EUR" in request.messages[0].content  # 5 tokens: fits
        assert "word" not in request.messages[0].content  # the budget was spent
        assert "I like short answers" not in str(request.messages)


async def test_post_hooks_see_the_stored_reply(tmp_path: Path) -> None:
    async with ChatHarness.from_file(write_bot(tmp_path, SHOP)) as bot:
        await bot.send("echo me")
        events = bot.engine.plugins.plugin("shop").events  # type: ignore[attr-defined]
        for _ in range(100):
            if ("post", "echo me", "echo me") in events:
                break
            await asyncio.sleep(0.01)
        assert ("post", "echo me", "echo me") in events


async def test_lifecycle_starts_and_stops_the_plugin_and_its_tasks(tmp_path: Path) -> None:
    bot = ChatHarness.from_file(write_bot(tmp_path, SHOP))
    handle: Any = bot.engine.plugins.plugin("shop")
    async with bot:
        assert handle.events == [("start",)]
        (task,) = handle._tasks
        assert not task.done()
    assert handle.events == [("start",), ("stop",)]
    assert task.cancelled()


async def test_a_failing_plugin_gets_the_user_an_apology_a_log_line_and_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    bot_file = write_bot(tmp_path, SHOP, extra="timeout = 0.2")
    text = bot_file.read_text().replace("timeout = 0.2", "")
    bot_file.write_text(text.replace("[plugins]\n", "[plugins]\ntimeout = 0.2\n"))
    async with ChatHarness.from_file(bot_file) as bot:
        with caplog.at_level(logging.ERROR):
            reply = await bot.send("/boom")
        assert (reply.kind, reply.code) == ("error", "plugin_failed")
        assert reply.text.startswith("Sorry")
        assert any("plugin shop: command /boom failed (RuntimeError)" in r.getMessage()
                   for r in caplog.records)
        assert (await bot.send("/slow")).code == "plugin_failed"
        metrics = bot.engine.metrics.render().decode()
        assert 'parley_plugin_failures_total{bot="tbot",plugin="shop"} 2.0' in metrics
        # The bot keeps serving.
        assert (await bot.send("/hello")).code == "command"


async def test_outbound_messages_go_through_the_channels_adapter(tmp_path: Path) -> None:
    async with ChatHarness.from_file(write_bot(tmp_path, SHOP)) as bot:
        assert (await bot.send("/tell")).text == "sent"
        assert [(s.key.conversation_id, s.text) for s in bot.outbox] == [
            ("u1", "a message of my own")]
        reply = await bot.send("/tell", channel="nowhere")
        assert reply.code == "plugin_failed"  # no adapter serves that channel
        with pytest.raises(DeliveryError, match="no adapter delivers to channel 'nowhere'"):
            await bot.engine.plugins.services.outbox.send(
                ConversationKey("tbot", "nowhere", "c"), "x")


async def test_pause_silences_the_bot_without_storing_and_resume_restores_it(
    tmp_path: Path,
) -> None:
    generator = ScriptedGenerator(["model reply"])
    async with ChatHarness.from_file(write_bot(tmp_path, SHOP), generator=generator) as bot:
        assert (await bot.send("/pause")).text == "paused"
        quiet = await bot.send("anyone there?")
        assert (quiet.kind, quiet.code, quiet.text) == ("notice", "paused", "")
        events = bot.engine.plugins.plugin("shop").events  # type: ignore[attr-defined]
        assert ("paused-relay", "anyone there?") in events
        assert await turns(bot) == []
        assert generator.requests == []
        # Other conversations are not paused.
        assert (await bot.send("hi", user="u2")).text == "model reply"
        assert (await bot.send("/resume")).text == "resumed"
        assert (await bot.send("anyone there?")).text == "model reply"


async def test_storage_and_pauses_live_in_redis_across_front_ends(
    tmp_path: Path, redis_url: str, memory_prefix: str,
) -> None:
    bot_file = write_bot(tmp_path, SHOP)
    first = ChatHarness.from_file(bot_file, memory_url=redis_url, key_prefix=memory_prefix)
    second = ChatHarness.from_file(bot_file, memory_url=redis_url, key_prefix=memory_prefix)
    async with first, second:
        assert (await first.send("/count")).text == "1"
        assert (await second.send("/count")).text == "2"
        await first.send("/pause")
        assert (await second.send("hello?")).code == "paused"
    # And after a restart.
    async with ChatHarness.from_file(bot_file, memory_url=redis_url,
                                     key_prefix=memory_prefix) as third:
        assert (await third.send("hello?")).code == "paused"
        assert (await third.send("/count")).text == "3"

"""``parley run`` with Telegram enabled, as a real process, against the loopback fake.

The token and the webhook secret come from the environment, as in production; the fake
Bot API runs in the test and the process talks to it over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from bots.telegram.adapter import TelegramAdapter
from bots.testing.telegram import FakeTelegram
from core.app import build_adapters
from core.config import load_settings
from core.errors import ConfigError
from tests.test_telegram_webhook import free_port

REPO = Path(__file__).resolve().parents[1]
SECRET = "e2e-webhook-secret"
LIMITS = """
[adapters.telegram.limits]
chat_interval = 0.05
group_interval = 0.1
edit_interval = 0.05
group_edit_interval = 0.1
"""


def bot_file(tmp_path: Path, adapters: str) -> Path:
    path = tmp_path / "tgbot.toml"
    path.write_text(
        '[bot]\nname = "tge2e"\n[generation]\nbackend = "echo"\n'
        '[memory]\nbackend = "embedded"\n' + adapters + LIMITS,
        encoding="utf-8",
    )
    return path


def polling_bot(tmp_path: Path, telegram: FakeTelegram) -> Path:
    return bot_file(tmp_path, f"""
[adapters.telegram]
token = "${{TELEGRAM_TOKEN}}"
api_base_url = "{telegram.base_url}"
poll_timeout = 1
""")


def environment(telegram: FakeTelegram) -> dict[str, str]:
    return {**os.environ, "TELEGRAM_TOKEN": telegram.token, "TELEGRAM_SECRET": SECRET,
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@asynccontextmanager
async def parley_run(config: Path, telegram: FakeTelegram) -> AsyncIterator[None]:
    """``parley run CONFIG`` in the background; SIGTERM at the end, which must exit 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "core.cli", "run", str(config), cwd=REPO, env=environment(telegram),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        log = (out + err).decode(errors="replace")
        assert process.returncode == 0, log
        assert telegram.token not in log and SECRET not in log  # secrets stay out of logs


async def test_parley_run_answers_on_telegram_by_polling(tmp_path: Path) -> None:
    async with FakeTelegram() as telegram:
        config = polling_bot(tmp_path, telegram)
        async with parley_run(config, telegram):
            telegram.message("hello from a real process", chat_id=501)
            await telegram.wait_for(
                lambda: telegram.texts(501) == ["hello from a real process"], within=90)
            telegram.message("/help", chat_id=501)
            await telegram.wait_for(lambda: len(telegram.texts(501)) == 2, within=30)
        assert telegram.calls_to("getUpdates")
        assert [c["command"] for c in telegram.commands][:1] == ["start"]


async def test_an_update_survives_the_death_of_the_process_answering_it(
    tmp_path: Path,
) -> None:
    async with FakeTelegram() as telegram:
        config = polling_bot(tmp_path, telegram)
        doomed = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "core.cli", "run", str(config), cwd=REPO,
            env=environment(telegram),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await telegram.wait_for(lambda: telegram.calls_to("getUpdates"), within=90)
            # The reply's first message is told to wait two minutes: the process is
            # mid-reply, having fetched the update, when it is killed.
            telegram.fail("sendMessage", status=429, retry_after=120)
            telegram.message("do not lose me", chat_id=503)
            await telegram.wait_for(
                lambda: any(c.status == 429 for c in telegram.calls), within=30)
            polls = len(telegram.calls_to("getUpdates"))
            await telegram.wait_for(lambda: len(telegram.calls_to("getUpdates")) > polls,
                                    within=30)
        finally:
            doomed.kill()
            await doomed.wait()
        assert telegram.texts(503) == []
        assert telegram.pending == 1  # never confirmed
        async with parley_run(config, telegram):
            await telegram.wait_for(lambda: telegram.texts(503) == ["do not lose me"],
                                    within=90)
            await telegram.wait_for(lambda: telegram.pending == 0, within=30)
        assert telegram.texts(503) == ["do not lose me"]  # once


async def test_parley_run_answers_on_telegram_by_webhook(tmp_path: Path) -> None:
    port = free_port()
    async with FakeTelegram() as telegram:
        config = bot_file(tmp_path, f"""
[adapters.web]
host = "127.0.0.1"
port = {port}

[adapters.telegram]
token = "${{TELEGRAM_TOKEN}}"
api_base_url = "{telegram.base_url}"
mode = "webhook"
webhook_url = "http://127.0.0.1:{port}/telegram/webhook"
secret_token = "${{TELEGRAM_SECRET}}"
""")
        async with parley_run(config, telegram):
            await telegram.wait_for(lambda: telegram.webhook is not None, within=90)
            body = telegram.message("hello through the webhook", chat_id=502)
            await telegram.wait_for(lambda: 200 in telegram.delivered(body), within=30)
            assert telegram.texts(502) == ["hello through the webhook"]
            # The same server still serves the web channel.
            refused = await telegram.post(f"http://127.0.0.1:{port}/telegram/webhook", body,
                                          secret="wrong")
            assert refused == 403
        assert telegram.calls_to("getUpdates") == []


def test_the_example_telegram_bot_is_valid() -> None:
    settings = load_settings(REPO / "config/telegram.toml", env={"TELEGRAM_TOKEN": "1:x"})
    adapters = build_adapters(settings)  # each adapter validates its own table
    assert any(isinstance(a, TelegramAdapter) for a in adapters)
    with pytest.raises(ConfigError, match="TELEGRAM_TOKEN is not set"):
        load_settings(REPO / "config/telegram.toml", env={})

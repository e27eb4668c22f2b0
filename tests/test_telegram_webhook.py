"""Telegram's webhook mode, mounted on the web channel's aiohttp server.

The adapters are built as ``parley run`` builds them (core.app.build_adapters), so the
route seam between them is the real one; the fake Bot API posts updates to the webhook
the adapter registers, and delivers an update again when it is not answered with 200.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from bots.telegram.adapter import TelegramAdapter
from bots.testing.telegram import FakeTelegram
from core.app import build_adapters, build_engine
from core.config import BotSettings, parse_settings
from core.errors import ConfigError
from tests.test_telegram import FAST, Scripted

SECRET = "s3cret-Token_for-tests"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def webhook_settings(telegram: FakeTelegram, port: int, **overrides: Any) -> BotSettings:
    limits = {**FAST, **overrides.pop("limits", {})}
    return parse_settings(
        {
            "bot": {"name": "tghook"},
            "generation": {"backend": "echo"},
            "memory": {"backend": "embedded"},
            "adapters": {
                "web": {"host": "127.0.0.1", "port": port},
                "telegram": {
                    "token": telegram.token, "api_base_url": telegram.base_url,
                    "mode": "webhook", "webhook_url": f"http://127.0.0.1:{port}/tg/hook",
                    "secret_token": SECRET, "limits": limits, **overrides,
                },
            },
        },
        source="config/tghook.toml",
    )


@asynccontextmanager
async def webhook_bot(
    telegram: FakeTelegram, generator: Scripted | None = None, **overrides: Any
) -> AsyncIterator[str]:
    """A running web + telegram pair; yields the webhook's URL."""
    port = free_port()
    settings = webhook_settings(telegram, port, **overrides)
    adapters = build_adapters(settings)
    engine = build_engine(settings)
    if generator is not None:
        engine.generator = generator
    async with engine:
        started = []
        try:
            for adapter in adapters:
                await adapter.start(engine)
                started.append(adapter)
            yield f"http://127.0.0.1:{port}/tg/hook"
        finally:
            for adapter in reversed(started):
                await adapter.stop()


def update(telegram: FakeTelegram, text: str, chat_id: int = 31) -> dict[str, Any]:
    """A message update the fake does not deliver by itself (taken off its queue)."""
    body = telegram.message(text, chat_id=chat_id)
    telegram._updates.remove(body)
    return body


async def test_the_webhook_is_registered_with_its_secret_and_answers() -> None:
    async with FakeTelegram() as telegram, webhook_bot(telegram) as url:
        assert telegram.webhook is not None
        assert telegram.webhook["url"] == url
        assert telegram.webhook["secret_token"] == SECRET
        body = telegram.message("via the webhook", chat_id=30)  # the fake posts it
        await telegram.wait_for(lambda: telegram.delivered(body))
        assert telegram.delivered(body) == [200]
        assert telegram.texts(30) == ["via the webhook"]
        assert telegram.calls_to("getUpdates") == []


async def test_a_wrong_or_missing_secret_is_refused_and_nothing_is_processed() -> None:
    async with FakeTelegram() as telegram, webhook_bot(telegram) as url:
        body = update(telegram, "forged")
        assert await telegram.post(url, body, secret="wrong-secret") == 403
        assert await telegram.post(url, body) == 403
        await asyncio.sleep(0.2)
        assert telegram.calls_to("sendMessage") == []
        assert telegram.calls_to("sendChatAction") == []
        assert await telegram.post(url, body, secret=SECRET) == 200
        assert telegram.texts(31) == ["forged"]


async def test_a_redelivered_update_is_answered_once() -> None:
    async with FakeTelegram() as telegram, webhook_bot(telegram) as url:
        body = update(telegram, "only once please")
        # Twice at the same time (Telegram retrying a slow answer), then once more later.
        statuses = await asyncio.gather(telegram.post(url, body, secret=SECRET),
                                        telegram.post(url, body, secret=SECRET))
        assert statuses == [200, 200]
        assert await telegram.post(url, body, secret=SECRET) == 200
        # The same message under a new update id (a re-sent update): the message id dedupes.
        again = dict(body, update_id=body["update_id"] + 1000)
        assert await telegram.post(url, again, secret=SECRET) == 200
        await asyncio.sleep(0.2)
        assert telegram.texts(31) == ["only once please"]
        assert len(telegram.calls_to("sendMessage")) == 1


async def test_a_failed_reply_is_answered_on_redelivery() -> None:
    async with FakeTelegram() as telegram, webhook_bot(
        telegram, limits={"max_retries": 1}, streaming=False
    ):
        # The first attempt and its one retry fail: the webhook says so, Telegram redelivers.
        telegram.fail("sendMessage", status=500, times=2)
        first = telegram.message("please answer", chat_id=32)
        await telegram.wait_for(lambda: 200 in telegram.delivered(first))
        assert telegram.delivered(first) == [500, 200]
        await asyncio.sleep(0.2)
        assert telegram.texts(32) == ["please answer"]
        assert len(telegram.calls_to("sendMessage")) == 1  # the one that got through


async def test_a_half_delivered_streamed_reply_is_finished_not_repeated() -> None:
    words = " ".join(f"w{i}" for i in range(30))
    async with FakeTelegram() as telegram, webhook_bot(
        telegram, Scripted(words, delay=0.02), limits={"max_retries": 0}
    ):
        first = telegram.message("stream it", chat_id=33)
        # The reply's first message is out; from now on Telegram refuses every edit.
        await telegram.wait_for(lambda: telegram.calls_to("sendMessage", chat_id=33))
        telegram.fail("editMessageText", status=502, times=10_000)
        await telegram.wait_for(lambda: any(d.status == 500 for d in telegram.deliveries))
        assert telegram.texts(33) != [words]  # the user saw part of it
        telegram.calm()
        await telegram.wait_for(lambda: 200 in telegram.delivered(first))
        statuses = telegram.delivered(first)
        assert statuses[0] == 500 and statuses[-1] == 200
        await asyncio.sleep(0.2)
        assert telegram.texts(33) == [words]
        assert len(telegram.calls_to("sendMessage", chat_id=33)) == 1  # finished, not resent


async def test_a_reply_lost_with_its_process_is_replayed_by_the_engine_on_redelivery() -> None:
    """The adapter that failed to deliver is gone (a restart); the engine stored the reply
    and replays it for the redelivered update, which the new adapter delivers, once."""
    async with FakeTelegram() as telegram:
        port = free_port()
        settings = webhook_settings(telegram, port, streaming=False,
                                    limits={"max_retries": 0})
        url = f"http://127.0.0.1:{port}/tg/hook"
        async with build_engine(settings) as engine:
            body = update(telegram, "remember me")
            first = build_adapters(settings)
            for adapter in first:
                await adapter.start(engine)
            telegram.fail("sendMessage", status=500, times=1)
            assert await telegram.post(url, body, secret=SECRET) == 500
            for adapter in reversed(first):
                await adapter.stop()
            assert telegram.texts(31) == []
            second = build_adapters(settings)
            for adapter in second:
                await adapter.start(engine)
            try:
                assert await telegram.post(url, body, secret=SECRET) == 200
                assert await telegram.post(url, body, secret=SECRET) == 200
            finally:
                for adapter in reversed(second):
                    await adapter.stop()
        assert telegram.texts(31) == ["remember me"]


async def test_malformed_webhook_updates_are_ignored() -> None:
    async with FakeTelegram() as telegram, webhook_bot(telegram) as url:
        assert await telegram.post(url, b"{not json", secret=SECRET) == 200
        assert await telegram.post(url, b"[1, 2]", secret=SECRET) == 200
        assert await telegram.post(url, {"update_id": 77, "message": "junk"},
                                   secret=SECRET) == 200
        assert await telegram.post(url, {"update_id": 78, "edited_message": {
            "message_id": 1, "date": 0, "edit_date": 1, "chat": {"id": 34, "type": "private"},
            "text": "edited"}}, secret=SECRET) == 200
        assert await telegram.post(url, update(telegram, "fine", chat_id=34),
                                   secret=SECRET) == 200
        assert telegram.texts(34) == ["fine"]


def test_webhook_mode_needs_the_web_adapter() -> None:
    settings = parse_settings(
        {"bot": {"name": "tghook"}, "adapters": {"telegram": {
            "token": "1:x", "mode": "webhook", "webhook_url": "https://example.org/tg",
            "secret_token": SECRET}}},
        source="config/tghook.toml",
    )
    with pytest.raises(ConfigError, match=r"config/tghook.toml: adapters.telegram: .*web"):
        build_adapters(settings)
    # Polling needs no HTTP server.
    polling = parse_settings({"bot": {"name": "tg"}, "adapters": {"telegram": {"token": "1:x"}}})
    assert isinstance(build_adapters(polling)[0], TelegramAdapter)

"""``parley run`` with Discord configured: the real process against the fake Discord."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from bots.testing.discord import FakeDiscord
from tests.discord_support import build_world, contents

REPO = Path(__file__).resolve().parents[1]


def bot_file(tmp_path: Path, discord: FakeDiscord) -> Path:
    path = tmp_path / "discordbot.toml"
    path.write_text(
        '[bot]\nname = "e2e"\n[generation]\nbackend = "echo"\n'
        '[memory]\nbackend = "embedded"\n'
        '[adapters.discord]\ntoken = "${DISCORD_TOKEN}"\n'
        f'api_base_url = "{discord.api_base_url}"\ngateway_url = "{discord.gateway_url}"\n'
        "guild_ready_timeout = 0.1\nedit_interval = 0.1\nreidentify_delay = 0.1\n",
        encoding="utf-8",
    )
    return path


async def test_parley_run_starts_and_answers_on_discord(tmp_path: Path) -> None:
    async with FakeDiscord(token="e2e-token") as discord:
        w = build_world(discord)
        env = {**os.environ, "DISCORD_TOKEN": discord.token, "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "core.cli", "run", str(bot_file(tmp_path, discord)),
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            await discord.gateway.wait_live(within=120)
            discord.post(w.dm, w.alice, "hello from a DM")
            discord.post(w.general, w.bob, f"<@{discord.bot_id}> hello from the guild")
            discord.post(w.general, w.bob, "not for the bot")
            await discord.wait_until(lambda: bool(discord.sent(w.dm))
                                     and bool(discord.sent(w.general)), within=60)
            await discord.wait_until(lambda: discord.command_names() == ["help", "reset"])
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, stderr.decode()
        assert b"Traceback" not in stderr, stderr.decode()
        assert contents(discord.sent(w.dm)) == ["hello from a DM"]
        assert contents(discord.sent(w.general)) == ["hello from the guild"]


async def test_parley_run_exits_with_an_error_when_discord_drops_the_bot(tmp_path: Path) -> None:
    async with FakeDiscord(token="e2e-token") as discord:
        build_world(discord)
        env = {**os.environ, "DISCORD_TOKEN": discord.token, "HF_HUB_OFFLINE": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "core.cli", "run", str(bot_file(tmp_path, discord)),
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            await discord.gateway.wait_live(within=120)
            discord.gateway.token = "revoked"  # identifying again is refused (4004)
            discord.gateway.invalidate_session()
            _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 1, stderr.decode()
        assert b"adapter DiscordAdapter failed" in stderr, stderr.decode()


def test_check_accepts_the_example_discord_bot() -> None:
    env = {**os.environ, "DISCORD_TOKEN": "not-a-real-token", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "core.cli", "check", "config/discord.toml"],
                            capture_output=True, cwd=REPO, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert b"adapters: discord" in result.stdout


def test_check_without_the_token_names_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "core.cli", "check", "config/discord.toml"],
                            capture_output=True, cwd=REPO, env=env, timeout=300, check=False)
    assert result.returncode == 2
    assert b"config/discord.toml: adapters.discord.token: environment variable DISCORD_TOKEN" \
        in result.stderr

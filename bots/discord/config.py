"""``[adapters.discord]``: the Discord adapter's settings, validated on their own."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from core.config import Section

AnswerIn = Literal["mention", "always"]
# Discord ids are 64-bit integers; TOML table keys are strings.
Snowflake = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}$")]
MAX_MESSAGE_CHARS = 2000


class PlaceSettings(Section):
    """What applies in one guild or channel: ``[adapters.discord.channels."ID"]``."""

    answer_in: AnswerIn


class DiscordSettings(Section):
    """``[adapters.discord]``.

    ``answer_in``: in guild channels, answer only when addressed (``mention``: mentioned,
    replied to or prefixed) or to every message (``always``); a channel's setting beats
    its guild's, which beats this one (a thread falls back to its parent channel). DMs
    are always answered.
    """

    token: str = Field(min_length=1)  # "${DISCORD_TOKEN}": from the environment
    # A REST / gateway proxy, or a fake Discord in tests; default: Discord itself.
    api_base_url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    gateway_url: str | None = Field(default=None, pattern=r"^wss?://[^\s]+$")
    prefix: str | None = Field(default=None, min_length=1, max_length=16)
    answer_in: AnswerIn = "mention"
    guilds: dict[Snowflake, PlaceSettings] = {}
    channels: dict[Snowflake, PlaceSettings] = {}
    streaming: bool = True  # grow the reply by edits (false: one message at the end)
    edit_interval: float = Field(default=1.0, ge=0.01, le=60.0)  # seconds between edits
    typing_interval: float = Field(default=8.0, gt=0.0, le=10.0)  # Discord shows 10 s
    max_message_chars: int = Field(default=MAX_MESSAGE_CHARS, ge=16, le=MAX_MESSAGE_CHARS)
    sync_commands: bool = True  # register /help, /reset and plugin commands on start
    ready_timeout: float = Field(default=60.0, gt=0.0)  # how long start() waits for READY
    guild_ready_timeout: float = Field(default=2.0, gt=0.0, le=60.0)
    # Discord allows one IDENTIFY per 5 s; after an invalid session, wait this long.
    reidentify_delay: float = Field(default=5.0, ge=0.0, le=60.0)
    send_timeout: float = Field(default=120.0, gt=0.0)  # retrying one send through 429s
    recent_messages: int = Field(default=10_000, ge=100)  # ids remembered against redelivery

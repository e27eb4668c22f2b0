"""Whether the bot answers a Discord message, and what the message says to it."""

from __future__ import annotations

import re
from dataclasses import dataclass

import discord

from bots.discord.config import AnswerIn, DiscordSettings


@dataclass(frozen=True, slots=True)
class Addressed:
    """A message the bot answers: its text without the bot's mention or the prefix."""

    text: str
    conversation_id: str
    prefixed: bool = False  # addressed by the prefix ("!help")


def address(message: discord.Message, me: int, config: DiscordSettings) -> Addressed | None:
    """The message as the engine should see it, or None if the bot stays silent.

    Bots (this one included) and webhooks are never answered. DMs always are. In a guild
    channel the bot answers when mentioned, replied to or addressed by the prefix, or to
    everything where ``answer_in`` is ``always``. Each channel, and each thread, is a
    conversation of its own.
    """
    if message.author.bot or message.webhook_id is not None or message.author.id == me:
        return None
    text = message.content
    conversation = str(message.channel.id)
    if message.guild is None:
        return Addressed(_strip_mention(text, me), conversation)
    mentioned = any(user.id == me for user in message.mentions)
    resolved = message.reference.resolved if message.reference is not None else None
    replied = isinstance(resolved, discord.Message) and resolved.author.id == me
    prefixed = config.prefix is not None and text.startswith(config.prefix)
    if prefixed and config.prefix is not None:
        text = text[len(config.prefix) :]
    if mentioned or replied or prefixed:
        return Addressed(_strip_mention(text, me), conversation, prefixed)
    # Answering everything does not mean answering a picture without words.
    if _answer_in(message, config) == "always" and text.strip():
        return Addressed(_strip_mention(text, me), conversation)
    return None


def _answer_in(message: discord.Message, config: DiscordSettings) -> AnswerIn:
    """The channel's setting, else its parent's (a thread's), else the guild's, else the default."""
    channel = message.channel
    places = [channel.id, getattr(channel, "parent_id", None)]
    for place in places:
        if place is not None and str(place) in config.channels:
            return config.channels[str(place)].answer_in
    if message.guild is not None and str(message.guild.id) in config.guilds:
        return config.guilds[str(message.guild.id)].answer_in
    return config.answer_in


def _strip_mention(text: str, me: int) -> str:
    return re.sub(rf"<@!?{me}>", "", text).strip()

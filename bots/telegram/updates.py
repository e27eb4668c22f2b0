"""Which updates the bot answers, and what it hears: the group rules and commands.

In a private chat every text message is for the bot. In a group it answers, depending
on ``answer_in_groups``: every message (``always``); a mention of it, a reply to one of
its messages or a command (``mention``); or commands only (``commands``). A command
addressed to another bot (``/help@otherbot``) is never its business. Anything else
(stickers, edits, joins, channel posts) is not a message to answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from telegram import Message, MessageEntity, Update

GroupPolicy = Literal["mention", "always", "commands"]


@dataclass(frozen=True, slots=True)
class Addressed:
    """A message the bot should answer, as the engine should hear it."""

    chat_id: int
    thread_id: int | None  # a forum topic: a conversation of its own
    message_id: int
    user_id: int
    user_name: str | None
    text: str
    group: bool
    command: str | None  # "start" for "/start@thisbot", lowercased

    @property
    def conversation_id(self) -> str:
        """One conversation per chat, and per topic in a forum."""
        return str(self.chat_id) if self.thread_id is None else f"{self.chat_id}:{self.thread_id}"


def addressed(
    update: Update, *, username: str, bot_id: int, policy: GroupPolicy
) -> Addressed | None:
    """The message in ``update`` if the bot should answer it, else None."""
    message = update.message
    if message is None or message.text is None or message.from_user is None:
        return None
    if message.from_user.is_bot:
        return None
    chat = message.chat
    group = chat.type != "private"
    text = message.text
    command = _command(message, username)
    if command == "":
        return None  # a command for another bot
    if group:
        mentioned = _mentions(message, username)
        replied = (message.reply_to_message is not None
                   and message.reply_to_message.from_user is not None
                   and message.reply_to_message.from_user.id == bot_id)
        answers = {
            "always": True,
            "mention": command is not None or mentioned or replied,
            "commands": command is not None,
        }[policy]
        if not answers:
            return None
        text = _strip_mention(text, username)
    if command is not None:
        # The engine knows "/help", not "/help@thisbot".
        head, _, rest = text.partition(" ")
        text = f"/{command} {rest}".strip() if "@" in head else text
    if not text.strip():
        return None
    thread_id = message.message_thread_id if message.is_topic_message else None
    return Addressed(
        chat_id=chat.id,
        thread_id=thread_id,
        message_id=message.message_id,
        user_id=message.from_user.id,
        user_name=message.from_user.username or message.from_user.first_name,
        text=text,
        group=group,
        command=command,
    )


def _command(message: Message, username: str) -> str | None:
    """The command a message starts with (lowercased), "" if it is another bot's, None."""
    text = message.text or ""
    if not text.startswith("/"):
        return None
    head = text.split(maxsplit=1)[0][1:]
    name, _, target = head.partition("@")
    if target and target.lower() != username.lower():
        return ""
    return name.lower() if name else None


def _mentions(message: Message, username: str) -> bool:
    wanted = f"@{username}".lower()
    for entity, value in message.parse_entities([MessageEntity.MENTION]).items():
        if entity.type == MessageEntity.MENTION and value.lower() == wanted:
            return True
    return wanted in (message.text or "").lower().split()


def _strip_mention(text: str, username: str) -> str:
    wanted = f"@{username}".lower()
    return " ".join(w for w in text.split(" ") if w.lower().rstrip(",.:;!?") != wanted).strip()

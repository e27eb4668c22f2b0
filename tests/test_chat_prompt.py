"""The chat a bot's generator continues (core/prompt.py), through the real engine."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from core.generation.base import ChatMessage
from core.plugins import AddContext
from core.prompt import HistoryMessages, chat_messages
from core.testing import ChatHarness, ScriptedGenerator
from core.types import Turn

EXAMPLES = (("I just got back from a long run.", "Well done! Drink some water."),
            ("What did I tell you I just did?", "You just got back from a long run."))


def test_the_parts_come_in_order() -> None:
    messages = chat_messages(
        "You are Parley.",
        [AddContext("Today's special: jasmine."), AddContext("Call me Ann.", role="user"),
         AddContext("Stay in character.", after_history=True)],
        {"city": "Lisbon"},
        [Turn("user", "Hi, I'm Ann."), Turn("assistant", "Hello, Ann!")],
        "Which city do I live in?",
        EXAMPLES,
    )
    assert messages == [
        ChatMessage("system", "You are Parley.\n\nToday's special: jasmine.\n\n"
                              "What you know about this user: city: Lisbon"),
        ChatMessage("user", "Call me Ann."), ChatMessage("assistant", "Understood."),
        ChatMessage("user", EXAMPLES[0][0]), ChatMessage("assistant", EXAMPLES[0][1]),
        ChatMessage("user", EXAMPLES[1][0]), ChatMessage("assistant", EXAMPLES[1][1]),
        ChatMessage("user", "Hi, I'm Ann."), ChatMessage("assistant", "Hello, Ann!"),
        ChatMessage("user", "Which city do I live in?\n\nStay in character."),
    ]


async def test_a_bot_s_examples_reach_every_request_and_are_never_stored() -> None:
    generator = ScriptedGenerator(["Hello!", "You said hi."])
    harness = ChatHarness.from_dict(
        {"bot": {"name": "demo", "persona": "Be brief.",
                 "examples": [list(pair) for pair in EXAMPLES]}}, generator=generator)
    async with harness as bot:
        await bot.send("hi")
        await bot.send("what did I say?")
    last = generator.requests[-1].messages
    assert [m.content for m in last] == [
        "Be brief.", *(text for pair in EXAMPLES for text in pair),
        "hi", "Hello!", "what did I say?"]


def test_examples_are_pairs() -> None:
    with pytest.raises(ConfigError, match=r"bot\.examples"):
        ChatHarness.from_dict({"bot": {"name": "demo", "examples": [["only a question"]]}})


def test_history_messages_convert_each_kept_turn_once() -> None:
    history = HistoryMessages(size=2)
    a, b, c = Turn("user", "a", "u1"), Turn("assistant", "b"), Turn("system", "hidden")
    first = history("c1", (a, b))
    assert first == [ChatMessage("user", "a"), ChatMessage("assistant", "b")]
    d = Turn("user", "d", "u1")
    second = history("c1", (b, c, d))  # a left the window; c is never sent
    assert second == [ChatMessage("assistant", "b"), ChatMessage("user", "d")]
    assert second[0] is first[1]  # the kept turn was not converted again
    assert history("c2", (Turn("assistant", "b"),))[0] is not first[1]  # an equal turn
    assert chat_messages("P", [], {}, (b, c, d), "e", history=second) == chat_messages(
        "P", [], {}, (b, c, d), "e")

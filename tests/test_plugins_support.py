"""The support desk's plugins through the chat harness: faq, handoff, instructions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.config import ConfigError
from core.generation.base import GenerationRequest
from core.testing import ChatHarness, ScriptedGenerator
from core.types import ConversationKey

REPO = Path(__file__).resolve().parents[1]

FAQ = [
    {"id": "hours", "questions": ["When are you open?", "What are your opening hours?"],
     "answer": "We are open 9:00-17:00, Monday to Friday."},
    {"id": "refund", "questions": ["How do I get a refund?", "Can I get my money back?"],
     "answer": "Refunds are paid within 5 days of your return."},
    {"id": "shipping", "questions": ["How much is shipping?", "What does delivery cost?"],
     "answer": "Shipping is free over 49 euros."},
]


def support_bot(tmp_path: Path, **plugins: Any) -> dict[str, Any]:
    """A support bot on BM25 (no model) with thresholds the tests can reason about."""
    (tmp_path / "faq.json").write_text(json.dumps(FAQ), encoding="utf-8")
    tables = {
        "modules": ["plugins.handoff", "plugins.faq", "plugins.instructions"],
        "admins": {"web": ["agent-1"]},
        "faq": {"file": "faq.json", "retriever": "bm25", "direct_threshold": 0.8,
                "context_threshold": 0.2, "margin": 0.0},
        "handoff": {"agents_channel": "agents", "agents_conversation": "desk",
                    "after_faq_misses": 2},
    }
    for name, table in plugins.items():
        tables[name] = {**tables.get(name, {}), **table}
    return {"bot": {"name": "desk"}, "generation": {"backend": "echo"},
            "moderation": {"backend": "filters", "blocklist": ["frobnitz"]},
            "plugins": tables}


def harness(tmp_path: Path, generator: ScriptedGenerator | None = None,
            only: str | None = None, **kwargs: Any) -> ChatHarness:
    raw = support_bot(tmp_path)
    if only is not None:  # just this plugin
        raw["plugins"] = {"modules": [f"plugins.{only}"], **(
            {only: raw["plugins"][only]} if only in raw["plugins"] else {})}
    return ChatHarness.from_dict(raw, source=str(tmp_path / "bot.toml"),
                                 generator=generator, channel="web",
                                 channels=["agents", "telegram"], **kwargs)


async def test_faq_answers_directly_with_the_entry_and_names_it(tmp_path: Path) -> None:
    async with harness(tmp_path) as bot:
        reply = await bot.send("what are your opening hours?")
        assert (reply.kind, reply.text) == ("final", FAQ[0]["answer"])
        assert reply.metadata["faq_entry"] == "hours"
        assert reply.metadata["faq_outcome"] == "direct"
        metrics = bot.engine.metrics.render().decode()
        assert ('parley_faq_answers_total{bot="desk",entry="hours",outcome="direct"} 1.0'
                in metrics)


async def test_faq_between_thresholds_lets_the_model_answer_from_the_entries(
    tmp_path: Path,
) -> None:
    generator = ScriptedGenerator(["Refunds take about five days."])
    async with harness(tmp_path, generator) as bot:
        reply = await bot.send("refund for my broken kettle please")
        assert reply.text == "Refunds take about five days."
        system = generator.requests[-1].messages[0].content
        assert "using only the FAQ entries below" in system
        assert FAQ[1]["answer"] in system


async def test_faq_below_the_threshold_says_so_and_two_misses_call_a_human(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path) as bot:
        first = await bot.send("do you sell garden gnomes?", user="cat")
        assert first.text.startswith("Sorry, I don't know the answer")
        assert first.metadata["faq_outcome"] == "abstain"
        assert bot.outbox == []
        await bot.send("is the moon made of cheese?", user="cat")
        (note,) = bot.outbox
        assert note.key == ConversationKey("desk", "agents", "desk")
        assert "2 questions the FAQ could not answer" in note.text
        assert (await bot.send("hello?", user="cat")).code == "silent"


def test_a_missing_faq_file_stops_start_up_naming_it(tmp_path: Path) -> None:
    raw = support_bot(tmp_path, faq={"file": "nope.json"})
    with pytest.raises(ConfigError, match=r"bot.toml: plugins.faq.file: .*nope.json"):
        ChatHarness.from_dict(raw, source=str(tmp_path / "bot.toml"))


async def test_handoff_relays_both_ways_and_gives_back_to_the_bot(tmp_path: Path) -> None:
    generator = ScriptedGenerator(["model reply"])
    async with harness(tmp_path, generator) as bot:
        handed = await bot.send("/human", user="dan")
        assert "colleague" in handed.text
        (note,) = bot.outbox
        assert "user dan needs a human" in note.text and "/reply web:dan" in note.text
        quiet = await bot.send("my thermostat is blinking red", user="dan")
        assert (quiet.kind, quiet.code) == ("notice", "silent")
        assert bot.outbox[-1].text == "[web:dan] dan: my thermostat is blinking red"
        # The agent answers from the agents' conversation.
        sent = await bot.send("/reply web:dan Hold the dial for 10 seconds.",
                              user="agent-1", channel="agents", conversation="desk")
        assert sent.text == "Sent to web:dan."
        assert bot.outbox[-1].key == ConversationKey("desk", "web", "dan")
        assert bot.outbox[-1].text == "Hold the dial for 10 seconds."
        # Anyone else's /reply is refused.
        assert "Only agents" in (await bot.send("/reply web:dan hi", user="eve")).text
        assert generator.requests == []  # the model never saw the handed-over talk
        assert (await bot.send("/bot", user="dan")).text == "I'm back. How can I help?"
        assert (await bot.send("how much is shipping?", user="dan")).text == FAQ[2]["answer"]


async def test_an_angry_customer_is_handed_to_a_person(tmp_path: Path) -> None:
    async with harness(tmp_path) as bot:
        reply = await bot.send("This is RIDICULOUS, nothing works!!!", user="fay")
        assert "colleague" in reply.text
        assert "the user seems upset" in bot.outbox[-1].text
        agent = await bot.send("/release web:fay", user="agent-1", channel="agents",
                               conversation="desk")
        assert agent.text == "web:fay is back with the bot."
        assert bot.outbox[-1].text == "I'm back. How can I help?"


async def test_a_handoff_survives_a_restart_and_holds_on_another_front_end(
    tmp_path: Path, redis_url: str, memory_prefix: str,
) -> None:
    async with harness(tmp_path, memory_url=redis_url, key_prefix=memory_prefix) as one:
        await one.send("/human", user="gus")
    async with harness(tmp_path, memory_url=redis_url, key_prefix=memory_prefix) as two:
        assert (await two.send("still there?", user="gus")).code == "silent"
        assert two.outbox[-1].text == "[web:gus] gus: still there?"


async def test_instructions_are_kept_shown_capped_moderated_and_given_as_user_words(
    tmp_path: Path,
) -> None:
    generator = ScriptedGenerator(["ok"])
    async with harness(tmp_path, generator, only="instructions") as bot:
        assert "no instructions" in (await bot.send("/instructions")).text
        saved = await bot.send("/instructions I am a nurse; answer in short sentences.")
        assert saved.text.startswith("Saved")
        assert (await bot.send("/instructions")).text == (
            "Your instructions: I am a nurse; answer in short sentences.")
        too_long = await bot.send("/instructions " + "I work nights at a hospital and like "
                                  "short, practical answers with numbers. " * 9)
        assert "at most 600 characters" in too_long.text
        refused = await bot.send("/instructions always say frobnitz")
        assert (refused.kind, refused.code) == ("notice", "moderated")
        assert "frobnitz" not in (await bot.send("/instructions")).text
        await bot.send("hello there")
        request: GenerationRequest = generator.requests[-1]
        assert request.messages[1].role == "user"
        assert "I am a nurse" in request.messages[1].content
        assert "I am a nurse" not in request.messages[0].content
        # Another user gets none of it.
        await bot.send("hello", user="other")
        assert "I am a nurse" not in str(generator.requests[-1].messages)
        assert (await bot.send("/instructions clear")).text == "Your instructions are deleted."


async def test_link_joins_two_channels_with_a_one_time_code(tmp_path: Path) -> None:
    generator = ScriptedGenerator(["ok"])
    async with harness(tmp_path, generator, only="instructions") as bot:
        await bot.send("/instructions Call me Captain.", user="w1")
        offer = await bot.send("/link", user="w1")
        code = offer.text.split("code is ")[1].split(".")[0]
        assert "expired" in (await bot.send("/link 000-00", user="t1",
                                            channel="telegram")).text
        linked = await bot.send(f"/link {code}", user="t1", channel="telegram")
        assert linked.text == "Linked: this account and your web account are now one."
        again = await bot.send(f"/link {code}", user="t2", channel="telegram")
        assert "unknown or has expired" in again.text  # one use only
        await bot.send("hi", user="t1", channel="telegram")
        assert "Call me Captain." in generator.requests[-1].messages[1].content


async def test_with_no_way_to_reach_agents_the_user_is_told_and_the_bot_stays(
    tmp_path: Path,
) -> None:
    raw = support_bot(tmp_path)
    bot = ChatHarness.from_dict(raw, source=str(tmp_path / "bot.toml"), channel="web")
    async with bot:  # no adapter serves the "agents" channel here
        reply = await bot.send("/human", user="hal")
        assert reply.text.startswith("Sorry, I can't reach a colleague right now")
        assert (await bot.send("how much is shipping?", user="hal")).text == FAQ[2]["answer"]
        metrics = bot.engine.metrics.render().decode()
        assert 'parley_plugin_failures_total{bot="desk",plugin="handoff"} 1.0' in metrics


async def test_a_moderation_escalation_hands_the_conversation_to_people(
    tmp_path: Path,
) -> None:
    raw = support_bot(tmp_path)
    raw["moderation"]["actions"] = {"terms": "escalate"}
    bot = ChatHarness.from_dict(raw, source=str(tmp_path / "bot.toml"), channel="web",
                                channels=["agents"])
    async with bot:
        reply = await bot.send("you frobnitz", user="ivy")
        assert (reply.kind, reply.code) == ("notice", "moderated")
        (note,) = bot.outbox
        assert "moderation escalated the conversation" in note.text
        assert (await bot.send("hello?", user="ivy")).code == "silent"

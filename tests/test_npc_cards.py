"""NPC character cards (V1/V2/V3, JSON, PNG, TOML), lorebook triggering and the prompt."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigError
from plugins.npc import prompt
from plugins.npc.cards import (
    LoreEntry,
    load_card,
    load_cards,
    load_lorebook,
    png_text_chunks,
    png_with_text,
)
from plugins.npc.lore import select


def tiny_png() -> bytes:
    """A real 1x1 grey PNG."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


def card_json(spec: str, **data: Any) -> dict[str, Any]:
    fields = {"name": "Mira", "description": "A blacksmith of {{char}}'s village.",
              "personality": "gruff but kind", "scenario": "The forge at dusk.",
              "first_mes": "What do you need, {{user}}?", "mes_example": "<START>\nMira: Hm.",
              "system_prompt": "You are {{char}}.",
              "post_history_instructions": "Never mention the mine.", **data}
    version = "3.0" if spec.endswith("v3") else "2.0"
    return {"spec": spec, "spec_version": version, "data": fields}


def system_text(path: Path, **extra: Any) -> str:
    """The card's system text, then its post-history instructions (they go after the
    history: tests/test_npc_api.py checks where on the rendered prompt)."""
    card = load_card(path)
    system = prompt.build(card, player="Ann", lore="", game_state={}, relationship=0,
                          facts=(), emotions=["neutral"], actions=[], max_step=10, **extra)
    return f"{system}\n\n{prompt.post_history(card, player='Ann')}"


FIELDS = ["You are Mira.", "A blacksmith of Mira's village.", "gruff but kind",
          "The forge at dusk.", "What do you need, Ann?", "Mira: Hm.", "Never mention the mine."]


@pytest.mark.parametrize("spec", ["chara_card_v2", "chara_card_v3"])
def test_json_card_fields_reach_the_prompt(tmp_path: Path, spec: str) -> None:
    path = tmp_path / "mira.json"
    path.write_text(json.dumps(card_json(spec)))
    text = system_text(path)
    for field in FIELDS:
        assert field in text
    assert text.rstrip().endswith("Never mention the mine.")


@pytest.mark.parametrize(("keyword", "spec"), [("chara", "chara_card_v2"),
                                               ("ccv3", "chara_card_v3")])
def test_png_card_fields_reach_the_prompt(tmp_path: Path, keyword: str, spec: str) -> None:
    encoded = base64.b64encode(json.dumps(card_json(spec)).encode()).decode()
    path = tmp_path / "mira.png"
    path.write_bytes(png_with_text(tiny_png(), keyword, encoded))
    assert set(png_text_chunks(path.read_bytes())) == {keyword}
    assert load_card(path).spec == spec
    for field in FIELDS:
        assert field in system_text(path)


def test_png_prefers_the_v3_chunk(tmp_path: Path) -> None:
    v2 = base64.b64encode(json.dumps(card_json("chara_card_v2", name="Old")).encode()).decode()
    v3 = base64.b64encode(json.dumps(card_json("chara_card_v3", name="New")).encode()).decode()
    path = tmp_path / "x.png"
    path.write_bytes(png_with_text(png_with_text(tiny_png(), "chara", v2), "ccv3", v3))
    assert load_card(path).name == "New"


def test_toml_card_and_folder_ids(tmp_path: Path) -> None:
    (tmp_path / "guard.toml").write_text(
        'name = "Bram"\ndescription = "The gate guard."\n'
        '[extensions.parley]\nactions = ["open_gate"]\n')
    (tmp_path / "mira.json").write_text(json.dumps(card_json("chara_card_v2")))
    (tmp_path / "notes.txt").write_text("not a card")
    cards = load_cards(tmp_path)
    assert sorted(cards) == ["guard", "mira"]
    assert cards["guard"].extras.actions == ["open_gate"]


@pytest.mark.parametrize(("content", "reason"), [
    ("{", "Expecting"),
    (json.dumps({"spec": "chara_card_v9", "data": {}}), "unknown card spec"),
    (json.dumps({"spec": "chara_card_v2", "data": {"name": ""}}), "name"),
    (json.dumps(card_json("chara_card_v2", extensions={"parley": {"actoins": []}})),
     "actoins"),
])
def test_bad_cards_say_which_file_and_why(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=reason) as caught:
        load_cards(tmp_path)
    assert str(path) in str(caught.value)


def test_png_without_card_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    path.write_bytes(tiny_png())
    with pytest.raises(ConfigError, match="no chara or ccv3"):
        load_card(path)


def entry(content: str, *keys: str, **fields: Any) -> LoreEntry:
    return LoreEntry(keys=list(keys), content=content, **fields)


def chosen(entries: list[LoreEntry], text: str, budget: int = 1000, **kw: Any) -> list[str]:
    return [e.content for e in select(entries, text, budget=budget, **kw).entries]


def test_keys_trigger_entries_as_whole_words_ignoring_case() -> None:
    entries = [entry("ALE", "ale"), entry("MINE", "Old Mine")]
    assert chosen(entries, "Tell me a tale about the old mine") == ["MINE"]


def test_case_sensitive_and_regex_and_selective_entries() -> None:
    entries = [
        entry("KING", "King", case_sensitive=True),
        entry("DRAGON", r"drag(on|ons)\b", use_regex=True),
        entry("SLASHED", "/WOLF+/i", use_regex=True),
        entry("TAX", "tax", selective=True, secondary_keys=["king", "lord"]),
        entry("OFF", "king", enabled=False),
    ]
    assert chosen(entries, "the king has dragons") == ["DRAGON"]
    assert chosen(entries, "The King raised the tax") == ["KING", "TAX"]
    assert chosen(entries, "the tax is high") == []
    assert chosen(entries, "a wolfff howls") == ["SLASHED"]


def test_constant_entries_priority_budget_and_insertion_order() -> None:
    entries = [
        entry("C" * 40, constant=True, insertion_order=5),      # 11 tokens, always in
        entry("L" * 40, "x", priority=1, insertion_order=1),    # lowest priority: dropped
        entry("H" * 40, "x", priority=9, insertion_order=9),
        entry("M" * 40, "x", priority=5, insertion_order=3),
    ]
    assert chosen(entries, "x", budget=33) == ["M" * 40, "C" * 40, "H" * 40]
    assert chosen(entries, "nothing", budget=0) == ["C" * 40]


def test_recursion_is_bounded() -> None:
    entries = [entry("about the mine", "forge"), entry("the mine has a dragon", "mine"),
               entry("the dragon sleeps", "dragon")]
    assert chosen(entries, "forge", max_recursion=0) == ["about the mine"]
    assert len(chosen(entries, "forge", max_recursion=1)) == 2
    assert len(chosen(entries, "forge", max_recursion=2)) == 3
    assert len(chosen(entries, "forge", recursive=False)) == 1


def test_game_state_and_player_reach_the_prompt(tmp_path: Path) -> None:
    path = tmp_path / "mira.json"
    path.write_text(json.dumps(card_json("chara_card_v2")))
    text = prompt.build(load_card(path), player="Ann", lore="The mine is closed.",
                        game_state={"location": "forge", "quest_flags": {"ring": True}},
                        relationship=-40, facts=("Ann owes 3 gold",),
                        emotions=["calm", "angry"], actions=["give_item"], max_step=5)
    for part in ("The mine is closed.", "location: forge", '"ring": true', "-40",
                 "hostile", "Ann owes 3 gold", "calm, angry", "give_item"):
        assert part in text


def test_shared_lorebook_file(tmp_path: Path) -> None:
    path = tmp_path / "world.json"
    path.write_text(json.dumps({"name": "world", "token_budget": 50,
                                "entries": [{"keys": ["mine"], "content": "Closed."}]}))
    book = load_lorebook(path)
    assert book.token_budget == 50 and book.entries[0].content == "Closed."

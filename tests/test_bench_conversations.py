"""The checks bench/conversations.py counts replies with, on replies written by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "conversations.py"


@pytest.fixture(scope="module")
def checks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_conversations", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("text", "loop"), [
    ("I'm glad to have you as a creative and creative person. " * 3, True),
    ("It is what it is. Really. It is what it is.", True),
    ("it is very very very very very good", True),
    ("Sure! Your order number is 58213. Anything else?", False),
    ("Yes, yes. Sure, sure.", False),  # short repeats are speech, not a loop
])
def test_loop(checks: ModuleType, text: str, loop: bool) -> None:
    assert checks.has_loop(text) is loop


@pytest.mark.parametrize(("text", "cut"), [
    ("Hello there.", False), ('He said "yes."', False), ("Really?!", False),
    ("**Done.**", False), ("Have a nice day 🙂", False), ("Thanks…", False),
    ("You can reset it by clicking the", True), ("Step 1:", True), ("", True),
])
def test_cut(checks: ModuleType, text: str, cut: bool) -> None:
    assert checks.is_cut(text) is cut


def test_sentences_and_facts(checks: ModuleType) -> None:
    assert checks.sentences('Hi! I am Bob. "Really?" he said. ok') == [
        "Hi!", "I am Bob.", '"Really?"', "he said.", "ok"]
    assert checks.uses_fact("Your dog is called biscuit!", ("Biscuit",))
    assert not checks.uses_fact("I don't know your dog's name.", ("Biscuit",))


def test_the_set_has_50_conversations_in_two_parts(checks: ModuleType) -> None:
    conversations = checks.load()
    assert len(conversations) == 50
    assert {c.split for c in conversations} == {"tune", "heldout"}
    assert len({c.id for c in conversations}) == 50
    for c in conversations:
        assert len(c.turns) >= 3
        assert all(0 < turn < len(c.turns) for turn in c.expect)  # asked after being told
    assert sum(bool(c.expect) for c in conversations if c.split == "heldout") >= 5

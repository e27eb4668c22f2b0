"""End to end on the real preset models: load through the local generator, get a reply.

The first run converts each preset into the default cache (about 20 s for SmolLM2 and a
minute for Gemma 3 on a CPU); later runs load the cache in seconds.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from core.config import parse_settings
from core.generation.base import ChatMessage, GenerationRequest, SamplingParams
from core.generation.local.generator import LocalGenerator
from core.generation.local.models import PRESETS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("preset", sorted(PRESETS))
async def test_a_preset_answers_hello(preset: str) -> None:
    if importlib.util.find_spec(PRESETS[preset].package) is None:
        pytest.skip(f"{preset} is not installed ({PRESETS[preset].install_hint})")
    settings = parse_settings({"bot": {"name": "preset-test"},
                               "generation": {"model": preset, "device": "auto"}})
    chat = (ChatMessage("system", "You are Parley, a friendly assistant of a bookshop."),
            ChatMessage("user", "Hello, who are you?"))
    async with LocalGenerator(settings) as generator:
        deltas = [d async for d in generator.stream(
            GenerationRequest(chat, SamplingParams(max_new_tokens=40, temperature=0.0)))]
    reply = "".join(d.text for d in deltas)
    assert reply.strip()
    assert deltas[-1].finish_reason in ("stop", "length")
    assert "User:" not in reply and "<|im_end|>" not in reply

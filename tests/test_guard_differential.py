"""The synchronous output guard (``Moderator.output_guard``) and the async one built on it
give the pieces, verdicts and reports the guard gave before it had a synchronous API.

``tests/data/guard_cases.json.gz`` holds what the async guard of 9d90fdf (the code before
the change) made of 2,400 random and adversarial replies cut into random deltas, under
nine configurations (``tests/support/guard_cases.py``, which also records it). No mocks:
the filters are the moderator's own; only the flaky classifiers are made up.
"""

from __future__ import annotations

import gzip
import json
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.config import parse_settings
from core.moderation.base import PassThroughModerator, ReplyWithheld
from core.moderation.moderator import FilterModerator
from core.types import IncomingMessage
from tests.support import guard_cases
from tests.support.guard import chunks

FIXTURE = Path(__file__).parent / "data" / "guard_cases.json.gz"


def _recorded() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(gzip.decompress(FIXTURE.read_bytes()))
    return data


def _first_difference(got: list[Any], want: list[Any]) -> str:
    cases = guard_cases.cases()
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a != b:
            return f"case {i} {cases[i]!r}: got {a!r}, recorded {b!r}"
    return ""


async def test_the_async_guard_gives_what_it_gave_before() -> None:
    recorded = _recorded()
    assert recorded["digest"] == guard_cases.digest(guard_cases.cases())
    got = await guard_cases.run()
    assert got == recorded["results"], _first_difference(got, recorded["results"])


async def test_the_synchronous_guard_gives_what_the_async_one_gave_before() -> None:
    recorded = _recorded()
    got = await guard_cases.run(sync=True)
    assert got == recorded["results"], _first_difference(got, recorded["results"])


async def test_the_two_agree_on_other_cuts_of_the_same_replies() -> None:
    rng = random.Random(1)
    items = []
    for name, deltas in guard_cases.cases()[:1200]:
        text = "".join(deltas)
        cuts = [rng.randrange(len(text) + 1) for _ in range(rng.randint(0, 30))]
        items.append((name, chunks(text, cuts)))
    assert await guard_cases.run(sync=True, items=items) == await guard_cases.run(items=items)


class _AwaitedClassifier:
    """A classifier that can only be awaited (as an external one): no inline scorer."""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def score(self, text: str) -> dict[str, float]:
        return {"insult": 1.0 if "rotten" in text else 0.0}


def _message(channel: str = "web") -> IncomingMessage:
    return IncomingMessage(bot="gbot", channel=channel, conversation_id="c1", user_id="u1",
                           message_id=uuid.uuid4().hex, text="hi")


async def test_a_guard_that_must_await_its_classifier_is_only_async() -> None:
    settings = parse_settings({"bot": {"name": "gbot"}, "generation": {"backend": "echo"},
                               "memory": {"backend": "embedded"},
                               "moderation": {"backend": "filters"}})
    async with FilterModerator(settings, classifier=_AwaitedClassifier()) as moderator:  # type: ignore[arg-type]
        assert moderator.output_guard(_message(), system="be kind") is None

        async def words() -> AsyncIterator[str]:
            for word in "you are a rotten apple , my friend , and that is that .".split():
                yield word + " "

        shown = []
        with pytest.raises(ReplyWithheld):
            async for piece in moderator.guard(_message(), words(), system="be kind"):
                shown.append(piece)
        assert "rotten" not in "".join(shown)
        assert moderator.counts["output:block"] == 1


async def test_without_output_filters_every_piece_shows_as_it_comes() -> None:
    settings = parse_settings({
        "bot": {"name": "gbot"}, "generation": {"backend": "echo"},
        "memory": {"backend": "embedded"},
        "moderation": {"backend": "filters", "channels": {"quiet": {"output_filters": []}}}})
    async with FilterModerator(settings) as moderator:
        for guard in (moderator.output_guard(_message("quiet")),
                      PassThroughModerator().output_guard(_message())):
            assert guard is not None
            assert guard.feed("you sh") == ["you sh"]
            assert guard.feed("ithead ") == ["ithead "]
            assert guard.finish() == []
            await guard.flush()

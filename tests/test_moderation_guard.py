"""The output guard's shortcuts keep its results: words keyed run by run as the whole
text is, a release point moved back by a recital to a clause end, the guard's filters
built once per system text yet each reply checked against its own. No mocks."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from core.config import parse_settings
from core.moderation.base import ReplyWithheld
from core.moderation.guard import GuardConfig
from core.moderation.leak import LeakDetector, _runs
from core.moderation.moderator import FilterModerator
from core.moderation.ngram import ScoreWindow, load_model
from core.moderation.normalise import _keys, normalise, words_of
from core.moderation.release import _plain_cut, _unit_cut, release_point
from core.types import IncomingMessage

# Single letters (which join when spelled out), leetspeak, separators, spaces of several
# kinds, combining marks and characters that decompose to a space plus one, invisible
# characters, look-alikes, CJK: what makes a word's keys depend on its neighbours.
TRICKY = [
    *"abcfkuyIOx01345789@$!|+€_.-,' \t\n", "\u00a0", "\u00b4", "\u0301", "\u200b",
    "\u00df", "\u043e", "\u4f60", "\u597d", "\uff41", "\u2003",
    "\u00a8", "\u0130", "\u03a3", "\ufdfa", "\u3000", " ", " "]


@hsettings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(TRICKY), max_size=40).map("".join))
def test_words_keyed_run_by_run_are_the_whole_text_s(text: str) -> None:
    # words_of keys each run of non-spaces once and keeps it; the result must be what
    # keying the text in one pass gives ("f u c k" -> "fuck" across the spaces).
    assert words_of(text) == _keys(text)[0]
    assert words_of(text) == _keys(text)[0]  # and again, from what was kept


def test_letters_spelled_out_across_spaces_still_join() -> None:
    assert words_of("you f u c k er") == ["you", "fuck", "er"]
    assert words_of("a b") == ["a", "b"]
    assert words_of("k.i.l.l  you, y o u  a r e") == ["kill", "you", "you", "are"]


def test_a_window_fed_normalised_text_scores_as_fed_the_text() -> None:
    model = load_model()
    plain, normalised = ScoreWindow(model, 12), ScoreWindow(model, 12)
    for piece in ["You are ", "a worthless ", "idiot. ", "Have a nice day ", "my friend."]:
        assert plain.feed(piece) == normalised.feed(normalise(piece))


def test_a_recital_moves_the_first_piece_back_to_a_clause_end() -> None:
    # Without the recital the first piece would be "Hi, you " (8 characters, no clause
    # end: not yet); the recital's start is held, which leaves "Hi, " -- a clause end,
    # released at once.
    leak = LeakDetector("you are Mira the innkeeper", 12)
    config = GuardConfig(terms=None, pii=None, classify=None, threshold=0.9, hold_chars=160,
                         replacement="-", fail_closed=True, timeout=1.0, leak=leak,
                         phrase_words=5)
    assert release_point("Hi, you are Mira the innkeeper ", "", config) == len("Hi, ")
    plain = GuardConfig(terms=None, pii=None, classify=None, threshold=0.9, hold_chars=160,
                        replacement="-", fail_closed=True, timeout=1.0, phrase_words=5)
    assert release_point("Hi, you are Mira the innkeeper ", "", plain) == 0


def test_most_deltas_are_judged_without_units_as_with_them() -> None:
    config = GuardConfig(terms=None, pii=None, classify=None, threshold=0.9, hold_chars=160,
                         replacement="-", fail_closed=True, timeout=1.0, phrase_words=5)
    # Five words and the one arriving: all held (4 + 1), nothing before them.
    assert release_point("the quest is long and", "", config) == 0
    # ... but a reply that starts with a line break releases it: a clause end.
    assert release_point("\nthe quest is long and", "", config) == 1
    # Before the five held words, 17 characters: enough for a first piece; 18 are not
    # enough for a later one (24), unless they end a clause (12 at least).
    assert release_point("so we ride north at dawn for gold and", "", config) == 17
    assert release_point("we ride north for gold at dawn and then", "so", config) == 0
    assert release_point("we ride north, for gold at dawn and then", "so", config) == 0
    assert release_point("we ride north for, gold at dawn and then", "so", config) == 19
    assert release_point("we ride north for gold at dawn and then home again", "so",
                         config) == 26


# Units of a reply as release_point sees them: words, system words and their starts,
# single letters, digits, data, capitals, clause marks, spaces of several kinds.
UNITS = ["the", "quest", "you", "are", "Mira", "inn", "innkeeper", "of", "Pony", "zebra",
         "quartz", "a", "f", "I", "x", "12", "020", "+44", "(555)", "123-4567", "NL91", "ABNA",
         "4111", "e.g.", "ok,", "so.", "why?", "Hi!", "and;", "x_y", "_", "naïve", "ß", "Σ"]
GAPS = [" ", " ", " ", "  ", "\n", "\t", " \n ", "\x1c", "\u00a0", "\u2003", ""]


@hsettings(max_examples=4000, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(UNITS), st.sampled_from(GAPS)), min_size=1,
                max_size=16),
       st.sampled_from(["", "so ", "you are "]), st.booleans(), st.integers(1, 5))
def test_the_cut_found_from_the_end_is_the_cut_found_from_the_units(
        parts: list[tuple[str, str]], shown: str, leak: bool, phrase_words: int) -> None:
    # release_point finds the units before the held words one rsplit at a time, from
    # the end (_plain_cut), where the text allows it; everywhere it must cut as the
    # units found by _UNIT do (_unit_cut).
    pending = "".join(unit + gap for unit, gap in parts)
    detector = LeakDetector(SYSTEM, 12, "zebra quartz") if leak else None
    config = GuardConfig(terms=None, pii=None, classify=None, threshold=0.9, hold_chars=160,
                         replacement="-", fail_closed=True, timeout=1.0, leak=detector,
                         phrase_words=phrase_words)
    words = config.hold_words if pending[-1:].isspace() else config.hold_words + 1
    held = pending.rsplit(None, words)
    if len(held) > words and not pending[:1].isspace():
        assert _plain_cut(pending, shown, config, held) == \
            _unit_cut(pending, shown, config, words)


SYSTEM = "You are Mira, the innkeeper of the Prancing Pony; you keep the inn."


@hsettings(max_examples=3000, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(UNITS), st.sampled_from(GAPS)), max_size=12),
       st.sampled_from(["", "x", "you", "Mi", "!", "_"]), st.sampled_from(["", "so ", "Mira "]),
       st.integers(12, 60))
def test_the_leak_s_shortcuts_answer_as_the_whole_search(
        parts: list[tuple[str, str]], end: str, shown: str, min_chars: int) -> None:
    # Where a run of system words ends the text, from its last word alone; whether the
    # text has too few system words for a leak, from their weights: as all the runs say.
    text = "".join(unit + gap for unit, gap in parts) + end
    leak = LeakDetector(SYSTEM, min_chars, "zebra quartz")
    before = shown[-leak.margin:]
    assert leak.trailing_run_start(shown, text) == leak._run_start(before + text, len(before))
    words = [w.casefold() for w in re.findall(r"\w+", shown + text)]
    found = None
    for index, (_, limit) in enumerate(leak._sequences):
        if _runs(words, leak._positions[index])[0] >= limit:
            found = "canary" if index else "system"
            break
    assert leak.find(shown + text) == found


def _settings(**moderation: Any) -> Any:
    return parse_settings({
        "bot": {"name": "mbot"}, "generation": {"backend": "echo"},
        "memory": {"backend": "embedded"},
        "moderation": {"backend": "filters", **moderation},
    })


async def _reply(moderator: FilterModerator, text: str, system: str,
                 channel: str = "web") -> tuple[str, bool]:
    message = IncomingMessage(bot="mbot", channel=channel, conversation_id="c1",
                              user_id="u1", message_id=uuid.uuid4().hex, text="hi")

    async def words() -> AsyncIterator[str]:
        for word in text.split(" "):
            yield word + " "

    shown: list[str] = []
    try:
        async for piece in moderator.guard(message, words(), system=system):
            shown.append(piece)
    except ReplyWithheld:
        return "".join(shown), True
    return "".join(shown), False


async def test_each_reply_is_checked_against_its_own_system_text() -> None:
    mira = "You are Mira, the innkeeper of the Prancing Pony, and you guard the cellar key."
    bard = "You are Bard, the archer of Lake-town, and you never miss a shot."
    recital = "Well, you are Mira, the innkeeper of the Prancing Pony, and you guard it."
    settings = _settings(channels={"quiet": {"output_filters": []}})
    async with FilterModerator(settings) as moderator:
        for _ in range(2):  # the second time with the filters kept from the first
            shown, withheld = await _reply(moderator, recital, mira)
            assert withheld and "Mira" not in shown
            shown, withheld = await _reply(moderator, recital, bard)
            assert not withheld and shown == recital + " "
            # A channel without output filters passes the reply on as it is.
            shown, withheld = await _reply(moderator, recital, mira, channel="quiet")
            assert not withheld and shown == recital + " "

"""Where the output guard may cut the reply it holds: how much can be released now.

What could still turn out to be part of something flagged is held back (the lookahead;
see :mod:`core.moderation.guard`), and what is before it is released only once it makes
a piece worth a round of checks.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.moderation.guard import GuardConfig

LOOKAHEAD = 2  # whole words always held back (an e-mail's "name (at) host...")
TAIL = 48  # characters held back in a run-on without any word boundary
# A piece is released once it has this many characters or ends a clause: a word at a
# time would check (and classify) the reply once per word. 12 before: twice the checks
# for pieces a user cannot tell apart at reading speed.
MIN_PIECE = 24
MIN_CLAUSE = 12  # a clause end releases a shorter piece, but not a tiny one
FIRST_PIECE = 12  # the first piece: as soon as it ends a clause or has this many
_CLAUSE_END = re.compile(r"[.,;:!?\u3002\uff0c\uff01\uff1f\n][\"')\]\u201d\u2019]*\s*$")
# Release units: a CJK character (Chinese has no spaces), or a run of other non-spaces,
# each with the spaces after it.
_UNIT = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af][ \t]*|[^\s\u2e80-\u9fff\uac00-\ud7af]+\s*"
                   r"|\s+")
BREAK = re.compile(r"[\s\u2e80-\u9fff\uac00-\ud7af]")  # what can complete a unit
_CJK_CHAR = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af]")
_CLAUSE_MARK = re.compile(r"[.,;:!?\u3002\uff0c\uff01\uff1f\n]")  # what _CLAUSE_END ends with
_CJK_LOOKAHEAD = 6  # characters: the longest Chinese term
# A unit that may belong to personal data still arriving: digits with separators, a
# "+", "(", or a short group of capitals and digits (IBAN "NL91 ABNA 0417").
_DATA_UNIT = re.compile(r"[+(]?[\dA-Z().\-]*\d[\dA-Z().\-/]*\s?|[+(]\s?|[A-Z]{2,4}\s?")


def release_point(pending: str, shown: str, config: GuardConfig) -> int:
    """How much of ``pending`` may be released now (0: nothing); see the module doc."""
    run_on = len(pending) > config.hold_chars
    # The last unit is incomplete until whitespace follows it; before it, enough whole
    # words for the longest phrase to complete.
    words = config.hold_words if pending[-1:].isspace() else config.hold_words + 1
    if not run_on and not pending[:1].isspace() \
            and (pending.isascii() or not _CJK_CHAR.search(pending)):
        # Most deltas release nothing; seen without the units: the words the lookahead
        # holds, or fewer, or before them less than a piece (and no clause end). (Units
        # are then runs of non-spaces, each with the spaces after it.)
        parts = pending.rsplit(None, words)
        if len(parts) <= words:
            return 0
        # Where the held words start, at the latest: a space at least between them.
        latest = len(pending) - sum(map(len, parts)) + len(parts[0]) - (words - 1)
        if not _enough(pending, latest, shown, _CLAUSE_MARK):
            return 0
        return _plain_cut(pending, shown, config, parts)
    return _unit_cut(pending, shown, config, words)


def _unit_cut(pending: str, shown: str, config: GuardConfig, words: int) -> int:
    """The cut, from ``pending``'s units (``words``: the whole words held back)."""
    run_on = len(pending) > config.hold_chars
    units = _UNIT.findall(pending)
    if not units:
        return 0
    keep = _CJK_LOOKAHEAD if _cjk(units[-1]) else words
    start = _held_from(units, keep)
    if start == 0:
        return _run_on(pending, config)
    cut = _piece(pending, units, start, shown)
    if not cut and not run_on and _CLAUSE_MARK.search(pending, 0, _offset(units, start)) is None:
        # Held text of the bot's instructions can only move the cut back, to a point
        # that is no clause end either: nothing to release, whatever it holds.
        return 0
    if config.leak is not None:
        run = config.leak.trailing_run_start(shown, pending)
        if run is not None:
            start = min(start, _unit_index(units, run))
            if start == 0:
                return _run_on(pending, config)
            cut = _piece(pending, units, start, shown)
    return cut


def _plain_cut(pending: str, shown: str, config: GuardConfig, parts: list[str]) -> int:
    """:func:`_unit_cut`'s cut, for ``pending`` that is no run-on, starts with no space
    and has no CJK: its units are then the runs of non-spaces (``parts``: its ``rsplit``
    at the words held), each with the spaces after it, and the units before the held
    words are found from the end, one ``rsplit`` each, instead of all by ``_UNIT``."""
    body = parts[0]  # the text before the held words, without the spaces after it
    at = pending.find(parts[1], len(body))  # where the held words start
    # Spelled-out letters and personal data still arriving (as _held_from).
    while True:
        begin = len(body) - len(body.rsplit(None, 1)[-1])
        unit = pending[begin:at]
        if not (_single(unit) or _DATA_UNIT.fullmatch(unit)):
            break
        if not begin:
            return 0  # every unit held, and no run-on: nothing to release
        at = begin
        body = pending[:at].rstrip()
    cut = at if _enough(pending, at, shown, _CLAUSE_END) else 0
    if not cut and _CLAUSE_MARK.search(pending, 0, at) is None:
        return 0
    if config.leak is not None:
        run = config.leak.trailing_run_start(shown, pending)
        if run is not None and run < at:
            # The unit that holds ``run``: the run of non-spaces there, or before the
            # spaces there.
            body = pending[:run + 1].rstrip()
            at = len(body) - len(body.rsplit(None, 1)[-1])
            if not at:
                return 0
            cut = at if _enough(pending, at, shown, _CLAUSE_END) else 0
    return cut


def _run_on(pending: str, config: GuardConfig) -> int:
    """The cut when every unit is held: one endless "word" releases all but its tail."""
    return len(pending) - TAIL if len(pending) > config.hold_chars else 0


def _piece(pending: str, units: list[str], start: int, shown: str) -> int:
    """The cut before unit ``start``, if it makes a piece worth a round of checks."""
    cut = _offset(units, start)
    return cut if _enough(pending, cut, shown, _CLAUSE_END) else 0


def _enough(pending: str, cut: int, shown: str, clause: re.Pattern[str]) -> bool:
    """Whether ``pending[:cut]`` is worth a round of checks: the first piece goes as soon
    as it ends a clause (``clause`` found up to the cut) or has FIRST_PIECE characters
    (the time to the first word is what a user feels); later pieces are longer, as each
    release costs a round of checks."""
    if not shown:
        return cut >= FIRST_PIECE or clause.search(pending, 0, cut) is not None
    return cut >= MIN_PIECE or (cut >= MIN_CLAUSE
                                and clause.search(pending, 0, cut) is not None)


def _offset(units: list[str], index: int) -> int:
    return sum(map(len, units[:index]))


def _held_from(units: list[str], keep: int) -> int:
    """The index of the first unit held back (the bot's instructions aside)."""
    start = len(units)
    count = 0
    # ``keep`` trailing words (whitespace-only units don't count).
    while start > 0 and count < keep:
        start -= 1
        if not units[start].isspace():
            count += 1
    # Spelled-out letters and personal data still arriving.
    while start > 0 and (_single(units[start - 1]) or _DATA_UNIT.fullmatch(units[start - 1])):
        start -= 1
    return start


def _single(unit: str) -> bool:
    word = unit.strip()
    return len(word) == 1 and word.isalpha()


def _cjk(unit: str) -> bool:
    return "\u2e80" <= unit[:1] < "\ua000" or "\uac00" <= unit[:1] < "\ud7b0"


def _unit_index(units: list[str], offset: int) -> int:
    at = 0
    for i, unit in enumerate(units):
        if at + len(unit) > offset:
            return i
        at += len(unit)
    return len(units)

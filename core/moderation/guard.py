"""The output guard: the model's reply is checked before any of it reaches a user.

The reply is released a few words at a time (a clause, or :data:`MIN_PIECE` characters),
as soon as they are safe -- not a sentence at a time -- so it still looks like streaming.
What could still turn out to be part of something flagged is held back (the lookahead):

- the word still arriving (complete only once a space follows it) and the
  :data:`LOOKAHEAD` words before it, or as many as the longest blocked phrase needs, so
  a term never shows in part;
- letters spelled out one by one (``f u c ...``), which may be joining into a word;
- a trailing run of digits and their separators (with the letters of an IBAN), so a
  phone number arriving digit by digit is never shown in part;
- the trailing words that repeat the bot's instructions (system text), so a reply that
  starts reciting its persona is cut before the recited part shows.

Before a piece is released the whole held text, plus the end of what was shown, is
checked: a blocklisted term anywhere in it withholds the reply (:class:`ReplyWithheld`);
so does a run of ``leak_chars`` characters of the system text, or the canary; the
classifier scores the reply's last :data:`CLASSIFY_CHARS` characters up to the release
point (a classifier with an incremental window, like the built-in n-gram model, is fed
each released piece, sentence by sentence, and scores its last :data:`CLASSIFY_WORDS` words
and the sentence on its own, so a release costs its own words); personal data is masked,
and a release point never cuts through it. Nothing is released that has not passed every
check, so a flagged span is never shown.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from core.moderation.base import ReplyWithheld
from core.moderation.classifier import Scores, by_category
from core.moderation.leak import LeakDetector
from core.moderation.normalise import Normalised, normalise
from core.moderation.pii import PiiDetector, Span
from core.moderation.policy import Finding
from core.moderation.release import BREAK, LOOKAHEAD, TAIL, release_point
from core.moderation.terms import TermFilter

log = logging.getLogger(__name__)

CLASSIFY_CHARS = 200  # how much of the reply, up to the release point, the classifier reads
CLASSIFY_WORDS = 40  # the same for a classifier that scores a window of words (about as much)
# ... and the current sentence on its own (up to this many words), so one bad sentence
# amid good ones is not averaged away.
SENTENCE_WORDS = 40
_SENTENCE = re.compile(r"(?<=[.!?;\u3002\uff01\uff1f\n])\s*")
_SENTENCE_END = re.compile(r"[.!?;\u3002\uff01\uff1f\n]\s*$")
# The categories the classifier may withhold a reply for: a bot that explains how to
# get help, or quotes an injection it refused, is not flagged for it.
OUTPUT_CATEGORIES = ("insult", "threat", "hate", "sexual")


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """The filters and limits of one guard."""

    terms: TermFilter | None
    pii: PiiDetector | None
    classify: Callable[[str], Awaitable[Scores]] | None
    threshold: float
    hold_chars: int
    replacement: str
    fail_closed: bool
    timeout: float
    # The classifier's in-process scorer, if it has one: called inline, not timed.
    classify_now: Callable[[str], Scores] | None = None
    thresholds: Mapping[str, float] | None = None  # by category, over ``threshold``
    leak: LeakDetector | None = None
    phrase_words: int = LOOKAHEAD  # the most words a blocked phrase has
    # The classifier's incremental window, if it has one (``window(size)``: an object
    # whose ``feed(piece)`` adds the piece and scores the last ``size`` words): each
    # release then costs its own words, not the last CLASSIFY_CHARS again.
    window: Callable[[int], ScoreWindow] | None = None
    # By output category: the score that withholds a reply (from the two above).
    limits: Mapping[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        thresholds = self.thresholds or {}
        object.__setattr__(self, "limits", {
            c: max(self.threshold, thresholds.get(c, self.threshold)) for c in OUTPUT_CATEGORIES
        })


class ScoreWindow(Protocol):
    """Scores of the last words of a growing text (see ``GuardConfig.window``)."""

    def feed(self, text: str | Normalised) -> Mapping[str, float]:
        """Add ``text`` (maybe normalised already) and return the scores of the window."""
        ...


# Called with the findings of a withheld or masked reply, the action, the filters that
# failed and the text concerned (hashed for the audit log, never stored).
Report = Callable[[list[Finding], str, tuple[str, ...], str], Awaitable[None]]


@dataclass(slots=True)
class _Shown:
    """What was released so far, and its end (for terms across the cut)."""

    tail: str = ""
    text: str = ""
    # The classifier's windows, fed what is released: the reply's last words, and the
    # sentence being released (renewed at each sentence end). Until the first sentence
    # end the sentence is the reply, and its window (of the same size) would hold the
    # same words: there is none (None) and the reply's scores count for both.
    window: ScoreWindow | None = None
    sentence: ScoreWindow | None = None


async def guard_stream(
    stream: AsyncIterator[str], config: GuardConfig, report: Report
) -> AsyncIterator[str]:
    """``stream`` with nothing flagged ever passed on; see the module docstring."""
    pending = ""
    shown = _Shown()
    if config.window is not None and config.classify is not None:
        shown.window = config.window(CLASSIFY_WORDS)
        if SENTENCE_WORDS != CLASSIFY_WORDS:
            shown.sentence = config.window(SENTENCE_WORDS)
    masked: list[Finding] = []
    degraded: list[str] = []
    async for piece in stream:
        pending += piece
        # Whether ``piece`` can have completed something: a space or a CJK character in
        # it, or a run-on past ``hold_chars``.
        if BREAK.search(piece) is None and len(pending) <= config.hold_chars:
            continue  # the word still arriving grew; nothing new is complete
        cut = release_point(pending, shown.text, config)
        if cut:
            segment, cut = await _check(pending, cut, shown, config, masked, degraded,
                                        report, final=False)
            if segment:
                pending = pending[cut:]
                _advance(shown, segment)
                yield segment
    if pending:
        segment, _ = await _check(pending, len(pending), shown, config, masked, degraded,
                                  report, final=True)
        if segment:
            yield segment
    if masked or degraded:
        await report(masked, "mask", tuple(degraded), "")


def _advance(shown: _Shown, segment: str) -> None:
    shown.text += segment
    shown.tail = (shown.tail + segment)[-TAIL:]


async def _check(
    pending: str, cut: int, shown: _Shown, config: GuardConfig, masked: list[Finding],
    degraded: list[str], report: Report, *, final: bool,
) -> tuple[str, int]:
    """The masked text to release up to ``cut`` (maybe moved back), and the cut."""
    if config.terms is not None:
        hit = config.terms.find(normalise(shown.tail + pending))
        if hit is not None:
            await _withhold(config, report, [Finding(hit.category, f"terms:{hit.term}",
                                                     source="terms")], degraded, pending)
    if config.leak is not None:
        # Runs of system words never straddle what was shown (their start is held), so
        # the end of it is enough.
        leaked = config.leak.find(shown.text[-config.leak.margin:] + pending)
        if leaked is not None:
            await _withhold(config, report, [Finding("leak", leaked, source="leak")],
                            degraded, pending)
    spans: list[Span] = []
    if config.pii is not None:
        spans = config.pii.find(pending)
        for span in spans:
            if span.start < cut < span.end and not final:
                cut = span.start  # never show a datum in part
        spans = [s for s in spans if s.end <= cut]
    segment = pending[:cut]
    if not segment:
        return "", 0
    if config.classify is not None and segment.strip():
        # The reply's recent text, not the sentence fragment alone: a few words score
        # wildly ("Most people" reads as hate), a few sentences score steadily.
        if shown.window is not None:
            feed = partial(_fed, shown, config)
            for sentence in _SENTENCE.split(segment):
                if sentence:
                    await _classify(sentence, config, report, degraded, feed)
        else:
            await _classify((shown.text + segment)[-CLASSIFY_CHARS:], config, report,
                            degraded)
    masked.extend(Finding("pii", span.kind, source="pii") for span in spans)
    return PiiDetector.mask(segment, spans), cut


def _fed(shown: _Shown, config: GuardConfig, text: str) -> Mapping[str, float]:
    """``text`` (part of one sentence) fed to the reply's and the sentence's windows;
    each category's higher score of the two."""
    assert shown.window is not None
    words = normalise(text)  # once for both windows
    scores: Mapping[str, float] = shown.window.feed(words)
    if shown.sentence is not None:
        scores = dict(scores)
        for category, score in shown.sentence.feed(words).items():
            scores[category] = max(score, scores.get(category, 0.0))
    if _SENTENCE_END.search(text) and config.window is not None:
        shown.sentence = config.window(SENTENCE_WORDS)
    return scores


async def _classify(text: str, config: GuardConfig, report: Report, degraded: list[str],
                    feed: Callable[[str], Scores] | None = None) -> None:
    assert config.classify is not None
    try:
        if feed is not None:
            scores = feed(text)
        elif config.classify_now is not None:
            scores = config.classify_now(text)
        else:
            async with asyncio.timeout(config.timeout):
                scores = await config.classify(text)
    except Exception as exc:
        log.warning("moderation: output classifier failed: %s", type(exc).__name__)
        if config.fail_closed:
            await _withhold(config, report, [Finding("failure", "classifier")],
                            ("classifier",), text)
        if "classifier" not in degraded:
            degraded.append("classifier")
        return
    limits = config.limits
    for category, score in by_category(scores).items():
        limit = limits.get(category)
        if limit is not None and score >= limit:
            await _withhold(config, report, [Finding(category, "classifier", score,
                                                     "classifier")], degraded, text)


async def _withhold(
    config: GuardConfig, report: Report, findings: list[Finding],
    degraded: tuple[str, ...] | list[str], content: str,
) -> None:
    await report(findings, "block", tuple(degraded), content)
    raise ReplyWithheld(config.replacement, ",".join(f.label() for f in findings),
                        tuple(sorted({f.kind for f in findings})))

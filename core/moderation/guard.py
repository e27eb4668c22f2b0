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

:class:`OutputGuard` is the guard of one reply, fed synchronously (``feed``, ``finish``);
:func:`guarded` is the async guard of a stream, built on it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

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
    limit_items: tuple[tuple[str, float], ...] = field(init=False, repr=False, compare=False)
    # Whole words held back before the one arriving: LOOKAHEAD, or as many as the longest
    # blocked phrase needs (from ``phrase_words``).
    hold_words: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hold_words", max(LOOKAHEAD, self.phrase_words - 1))
        thresholds = self.thresholds or {}
        object.__setattr__(self, "limits", {
            c: max(self.threshold, thresholds.get(c, self.threshold)) for c in OUTPUT_CATEGORIES
        })
        object.__setattr__(self, "limit_items", tuple(self.limits.items()))


class ScoreWindow(Protocol):
    """Scores of the last words of a growing text (see ``GuardConfig.window``)."""

    def feed(self, text: str | Normalised) -> Mapping[str, float]:
        """Add ``text`` (maybe normalised already) and return the scores of the window."""
        ...


# Called with the findings of a withheld or masked reply, the action, the filters that
# failed and the text concerned (hashed for the audit log, never stored).
Report = Callable[[list[Finding], str, tuple[str, ...], str], Awaitable[None]]


class OutputGuard:
    """The guard of one reply, fed its text as it arrives; see the module docstring.

    ``feed(text)`` returns the pieces safe to show now (none, or one), ``finish()`` the
    rest once the reply is complete; either raises :class:`ReplyWithheld` when the reply
    must not be shown. What the guard decided (a withheld or masked reply, a filter that
    failed) is reported by :meth:`flush`, to be awaited after ``finish()`` or a
    ``ReplyWithheld``. A guard whose classifier must be awaited (``awaits``: an external
    classifier, without an in-process scorer) is fed by :meth:`feed_async` and
    :meth:`finish_async` instead.
    """

    __slots__ = ("_degraded", "_masked", "_pending", "_renew", "_report", "_reports",
                 "_sentence", "_shown", "_window", "awaits", "config")

    def __init__(self, config: GuardConfig, report: Report) -> None:
        self.config = config
        self.awaits = (config.classify is not None and config.window is None
                       and config.classify_now is None)
        self._report = report
        self._pending = ""  # received, not yet released
        self._shown = ""  # released
        # The classifier's windows, fed what is released: the reply's last words, and the
        # sentence being released (renewed at each sentence end). Until the first sentence
        # end the sentence is the reply, and its window (of the same size) would hold the
        # same words: there is none (None) and the reply's scores count for both.
        self._window: ScoreWindow | None = None
        self._sentence: ScoreWindow | None = None
        self._renew = False  # a sentence ended: the next text starts a new sentence window
        if config.window is not None and config.classify is not None:
            self._window = config.window(CLASSIFY_WORDS)
            if SENTENCE_WORDS != CLASSIFY_WORDS:
                self._sentence = config.window(SENTENCE_WORDS)
        self._masked: list[Finding] = []
        self._degraded: list[str] = []
        self._reports: list[tuple[list[Finding], str, tuple[str, ...], str]] = []

    def feed(self, text: str) -> list[str]:
        """Add ``text`` to the reply; the pieces that may be shown now."""
        # (_take, inline: this runs for every delta of every reply.)
        pending = self._pending = self._pending + text
        if " " not in text and BREAK.search(text) is None \
                and len(pending) <= self.config.hold_chars:
            return []
        cut = release_point(pending, self._shown, self.config)
        return self._release(*self._check(cut, final=False)) if cut else []

    def finish(self) -> list[str]:
        """The reply is complete: the rest of it that may be shown."""
        pieces = self._release(*self._check(len(self._pending), final=True)) \
            if self._pending else []
        self._finished()
        return pieces

    async def feed_async(self, text: str) -> list[str]:
        """:meth:`feed`, awaiting the classifier."""
        cut = self._take(text)
        return await self._release_async(*self._check(cut, final=False)) if cut else []

    async def finish_async(self) -> list[str]:
        """:meth:`finish`, awaiting the classifier."""
        pieces = await self._release_async(*self._check(len(self._pending), final=True)) \
            if self._pending else []
        self._finished()
        return pieces

    async def flush(self) -> None:
        """Report what the guard decided so far (in the order it decided it)."""
        while self._reports:
            await self._report(*self._reports.pop(0))

    def _take(self, text: str) -> int:
        """Add ``text``; how much of what is held may be released (0: nothing)."""
        pending = self._pending = self._pending + text
        # Whether ``text`` can have completed something: a space or a CJK character in
        # it (a plain space, most deltas' own, seen without the pattern), or a run-on past
        # ``hold_chars``.
        if " " not in text and BREAK.search(text) is None \
                and len(pending) <= self.config.hold_chars:
            return 0  # the word still arriving grew; nothing new is complete
        return release_point(pending, self._shown, self.config)

    def _finished(self) -> None:
        if self._masked or self._degraded:
            self._reports.append((self._masked, "mask", tuple(self._degraded), ""))

    def _release(self, cut: int, spans: list[Span], ask: str | None) -> list[str]:
        """Release ``self._pending[:cut]``, ``spans`` masked, once ``ask`` is scored."""
        if not cut:
            return []
        if ask is not None:
            score = self.config.classify_now
            if score is None:
                raise TypeError("this guard's classifier must be awaited: use feed_async()")
            self._scored(ask, score)
        pending = self._pending
        if spans:
            self._masked.extend(Finding("pii", span.kind, source="pii") for span in spans)
            segment = PiiDetector.mask(pending[:cut], spans)
        else:
            segment = pending[:cut]
        self._pending = pending[cut:]
        self._shown += segment
        return [segment]

    async def _release_async(self, cut: int, spans: list[Span], ask: str | None) -> list[str]:
        if cut and ask is not None and self.config.classify_now is None:
            assert self.config.classify is not None
            try:
                async with asyncio.timeout(self.config.timeout):
                    scores = await self.config.classify(ask)
            except Exception as exc:
                self._failed(ask, exc)
            else:
                self._judge(ask, scores)
            ask = None
        return self._release(cut, spans, ask)

    def _check(self, cut: int, *, final: bool) -> tuple[int, list[Span], str | None]:
        """The cut (maybe moved back; 0: nothing to release), the personal data before it,
        and the text the classifier has yet to score (None: none, or scored already)."""
        config, shown, pending = self.config, self._shown, self._pending
        if config.terms is not None:
            hit = config.terms.find(normalise(shown[-TAIL:] + pending))
            if hit is not None:
                self._withhold([Finding(hit.category, f"terms:{hit.term}", source="terms")],
                               self._degraded, pending)
        if config.leak is not None:
            # Runs of system words never straddle what was shown (their start is held), so
            # the end of it is enough.
            leaked = config.leak.find(shown[-config.leak.margin:] + pending)
            if leaked is not None:
                self._withhold([Finding("leak", leaked, source="leak")], self._degraded,
                               pending)
        spans: list[Span] = []
        if config.pii is not None:
            spans = config.pii.find(pending)
            for span in spans:
                if span.start < cut < span.end and not final:
                    cut = span.start  # never show a datum in part
            spans = [s for s in spans if s.end <= cut]
        segment = pending[:cut]
        if not segment:
            return 0, spans, None
        if config.classify is None or segment.isspace():
            return cut, spans, None
        # The reply's recent text, not the sentence fragment alone: a few words score
        # wildly ("Most people" reads as hate), a few sentences score steadily.
        if self._window is None:
            return cut, spans, (shown + segment)[-CLASSIFY_CHARS:]
        for sentence in _SENTENCE.split(segment):
            if sentence:  # (_scored, inline)
                try:
                    scores = self._fed(sentence)
                except Exception as exc:
                    self._failed(sentence, exc)
                else:
                    self._judge(sentence, scores)
        return cut, spans, None

    def _fed(self, text: str) -> Mapping[str, float]:
        """``text`` (part of one sentence) fed to the reply's and the sentence's windows;
        each category's higher score of the two."""
        assert self._window is not None
        if self._renew:
            # Made now, not when the sentence before ended: a reply's last sentence end
            # needs none.
            self._renew = False
            if self.config.window is not None:
                self._sentence = self.config.window(SENTENCE_WORDS)
        words = normalise(text)  # once for both windows
        scores: Mapping[str, float] = self._window.feed(words)
        if self._sentence is not None:
            scores = dict(scores)
            for category, score in self._sentence.feed(words).items():
                scores[category] = max(score, scores.get(category, 0.0))
        if _SENTENCE_END.search(text):
            self._renew = True
        return scores

    def _scored(self, text: str, score: Callable[[str], Scores]) -> None:
        """``text`` scored by ``score`` and judged."""
        try:
            scores = score(text)
        except Exception as exc:
            self._failed(text, exc)
            return
        self._judge(text, scores)

    def _failed(self, text: str, exc: Exception) -> None:
        log.warning("moderation: output classifier failed: %s", type(exc).__name__)
        if self.config.fail_closed:
            self._withhold([Finding("failure", "classifier")], ("classifier",), text)
        if "classifier" not in self._degraded:
            self._degraded.append("classifier")

    def _judge(self, text: str, scores: Scores) -> None:
        if type(scores) is dict:
            # Most scores are under every limit: seen from the output categories alone.
            for category, bound in self.config.limit_items:
                score = scores.get(category)
                if score is not None and score >= bound:
                    break
            else:
                return
        limits = self.config.limits
        for category, score in by_category(scores).items():
            limit = limits.get(category)
            if limit is not None and score >= limit:
                self._withhold([Finding(category, "classifier", score, "classifier")],
                               self._degraded, text)

    def _withhold(self, findings: list[Finding], degraded: tuple[str, ...] | list[str],
                  content: str) -> NoReturn:
        self._reports.append((findings, "block", tuple(degraded), content))
        raise ReplyWithheld(self.config.replacement, ",".join(f.label() for f in findings),
                            tuple(sorted({f.kind for f in findings})))


async def guard_stream(
    stream: AsyncIterator[str], config: GuardConfig, report: Report
) -> AsyncIterator[str]:
    """``stream`` with nothing flagged ever passed on; see the module docstring."""
    async for piece in guarded(stream, OutputGuard(config, report)):
        yield piece


async def guarded(stream: AsyncIterator[str], guard: OutputGuard) -> AsyncIterator[str]:
    """``stream`` through ``guard`` (its reports sent as they are made)."""
    try:
        if guard.awaits:
            async for text in stream:
                for piece in await guard.feed_async(text):
                    yield piece
            pieces = await guard.finish_async()
        else:
            async for text in stream:
                for piece in guard.feed(text):
                    yield piece
            pieces = guard.finish()
    except ReplyWithheld:
        await guard.flush()
        raise
    for piece in pieces:
        yield piece
    await guard.flush()


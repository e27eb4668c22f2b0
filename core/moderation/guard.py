"""The output guard: the model's reply is checked before any of it reaches a user.

Text is held back until a sentence ends (or, in a long run-on, until ``hold_chars``
have piled up, keeping the last :data:`TAIL` characters back). Before a piece is
released the whole held text, plus the end of what was already shown, is checked:

- a blocklisted term anywhere in it withholds the reply (:class:`ReplyWithheld`);
- the classifier scores the sentence about to be released;
- personal data is masked, and a release point never cuts through a masked span, so
  a phone number arriving token by token is never shown in part.

Nothing is released that has not passed every check, so a flagged span is never shown.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from core.moderation.base import ReplyWithheld
from core.moderation.normalise import normalise
from core.moderation.pii import PiiDetector, Span
from core.moderation.policy import Finding
from core.moderation.terms import TermFilter

log = logging.getLogger(__name__)

TAIL = 48  # characters always held back in a run-on: longer than any masked datum
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"')\]\u201d\u2019]*\s+|\n+")


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """The filters and limits of one guard."""

    terms: TermFilter | None
    pii: PiiDetector | None
    classify: Callable[[str], Awaitable[float]] | None
    threshold: float
    hold_chars: int
    replacement: str
    fail_closed: bool
    timeout: float
    # The classifier's in-process scorer, if it has one: called inline, not timed.
    classify_now: Callable[[str], float] | None = None


# Called with the findings of a withheld or masked reply, the action, the filters that
# failed and the text concerned (hashed for the audit log, never stored).
Report = Callable[[list[Finding], str, tuple[str, ...], str], Awaitable[None]]


async def guard_stream(
    stream: AsyncIterator[str], config: GuardConfig, report: Report
) -> AsyncIterator[str]:
    """``stream`` with nothing flagged ever passed on; see the module docstring."""
    pending = ""
    shown_tail = ""
    masked: list[Finding] = []
    degraded: list[str] = []
    async for piece in stream:
        pending += piece
        cut = _release_point(pending, config.hold_chars)
        if cut:
            segment, cut = await _check(pending, cut, shown_tail, config, masked, degraded,
                                        report, final=False)
            if segment:
                pending = pending[cut:]
                shown_tail = (shown_tail + segment)[-TAIL:]
                yield segment
    if pending:
        segment, _ = await _check(pending, len(pending), shown_tail, config, masked, degraded,
                                  report, final=True)
        if segment:
            yield segment
    if masked or degraded:
        await report(masked, "mask", tuple(degraded), "")


def _release_point(pending: str, hold_chars: int) -> int:
    ends = [m.end() for m in _SENTENCE_END.finditer(pending)]
    if ends:
        return ends[-1]
    if len(pending) <= hold_chars:
        return 0
    limit = len(pending) - TAIL
    space = pending.rfind(" ", 0, limit)
    return space + 1 if space > 0 else limit


async def _check(
    pending: str, cut: int, shown_tail: str, config: GuardConfig, masked: list[Finding],
    degraded: list[str], report: Report, *, final: bool,
) -> tuple[str, int]:
    """The masked text to release up to ``cut`` (maybe moved back), and the cut."""
    if config.terms is not None:
        hit = config.terms.find(normalise(shown_tail + pending))
        if hit is not None:
            await _withhold(config, report, [Finding("terms", hit)], degraded, pending)
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
        try:
            if config.classify_now is not None:
                score = config.classify_now(segment)
            else:
                async with asyncio.timeout(config.timeout):
                    score = await config.classify(segment)
        except Exception as exc:
            log.warning("moderation: output classifier failed: %s", type(exc).__name__)
            if config.fail_closed:
                await _withhold(config, report, [Finding("failure", "classifier")],
                                ("classifier",), segment)
            if "classifier" not in degraded:
                degraded.append("classifier")
        else:
            if score >= config.threshold:
                await _withhold(config, report, [Finding("classifier", score=score)], degraded,
                                segment)
    masked.extend(Finding("pii", span.kind) for span in spans)
    return PiiDetector.mask(segment, spans), cut


async def _withhold(
    config: GuardConfig, report: Report, findings: list[Finding],
    degraded: tuple[str, ...] | list[str], content: str,
) -> None:
    await report(findings, "block", tuple(degraded), content)
    raise ReplyWithheld(config.replacement, ",".join(f.label() for f in findings))

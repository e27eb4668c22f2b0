"""The moderator's output side: the guard's filters for a channel and a system text, and
the report that counts and audits what the guard decides (see :mod:`core.moderation.guard`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from core.moderation.audit import Auditor
from core.moderation.base import Action
from core.moderation.classifier import Classifier
from core.moderation.guard import GuardConfig, Report
from core.moderation.leak import LeakDetector
from core.moderation.policy import Decision, Finding
from core.types import IncomingMessage

if TYPE_CHECKING:
    from core.moderation.input import _Channel

OUTPUT_FILTERS = ("terms", "classifier", "pii", "leak")


def guard_config(channel: _Channel, classifier: Classifier, system: str) -> GuardConfig | None:
    """The output guard's filters for a channel and a system text (None: no filters)."""
    policy = channel.policy
    filters = set(policy.output_filters)
    if not filters:
        return None
    leak = None
    if "leak" in filters:
        leak = LeakDetector(system, policy.leak_chars, policy.canary) or None
    terms = channel.terms if "terms" in filters else None
    return GuardConfig(
        terms=terms,
        pii=channel.pii if "pii" in filters else None,
        classify=classifier.score if "classifier" in filters else None,
        classify_now=channel.score_now if "classifier" in filters else None,
        threshold=policy.output_threshold,
        thresholds=channel.thresholds,
        hold_chars=policy.hold_chars,
        replacement=policy.output_replacement,
        fail_closed=policy.fail_output == "closed",
        timeout=policy.filter_timeout,
        leak=leak,
        phrase_words=terms.phrase_words if terms is not None else 1,
        window=getattr(classifier, "window", None) if "classifier" in filters else None,
    )


class GuardConfigs:
    """Output guard configs kept, by channel and system text (a LeakDetector is built from
    the text: once, not per reply); cleared when full. A detector holds every prefix of
    the text's words (a few hundred kB for a long persona with facts about the user)."""

    KEPT = 128

    def __init__(self, channel: Callable[[str], _Channel]) -> None:
        self._channel = channel  # a channel's filters, by its name
        self._kept: dict[tuple[str, str], GuardConfig] = {}

    def get(self, channel: str, system: str, *, keep: bool) -> GuardConfig | None:
        """The guard's filters for ``channel`` and ``system`` (None: no filters), kept if
        ``keep`` (once the classifier's thresholds are known)."""
        config = self._kept.get((channel, system))
        if config is None:
            built = self._channel(channel)
            config = guard_config(built, built.classifier, system)
            if config is not None and keep:
                if len(self._kept) >= self.KEPT:
                    self._kept.clear()
                self._kept[(channel, system)] = config
        return config


def guard_report(
    message: IncomingMessage, counts: Counter[str], auditor: Auditor,
    record: Callable[[dict[str, str], str, Decision], Awaitable[None]],
) -> Report:
    """The guard's report for a reply to ``message``: counted, and audited by ``record``."""

    async def report(
        findings: list[Finding], action: str, degraded: tuple[str, ...], content: str
    ) -> None:
        decision = Decision(Action(action), findings)
        counts[f"output:{action}"] += 1
        for category in {f.kind for f in findings}:
            counts[f"output:category:{category}"] += 1
        for name in degraded:
            counts[f"failure:output:{name}"] += 1
        entry = auditor.entry(message, "output", decision, content, degraded=degraded)
        await record(entry, f"{message.channel}:{message.user_id}", decision)

    return report

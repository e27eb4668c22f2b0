"""The moderator's input side: :meth:`admit` (flood control before the lane),
:meth:`check_input` and the per-channel input steps, with the decision and its audit
(see :mod:`core.moderation.moderator`, whose :class:`FilterModerator` this is part of).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from core.config import BotSettings, ModerationPolicy
from core.moderation import injection, patterns, spam
from core.moderation.audit import Auditor
from core.moderation.base import Action, Verdict
from core.moderation.classifier import Classifier, Scorer, by_category
from core.moderation.injection import check_injection
from core.moderation.multiscan import ViewSets
from core.moderation.normalise import Normalised, normalise
from core.moderation.pii import PiiDetector
from core.moderation.policy import Decision, Finding, apply_score, base_action, reply_for
from core.moderation.spam import check_spam
from core.moderation.state import Admission, Limits, ModerationState, message_member
from core.moderation.terms import TermFilter
from core.types import IncomingMessage

# The moderator's logger, as before these parts moved here.
log = logging.getLogger("core.moderation.moderator")

# What the terms' built-in patterns, injection and spam look for, each in its view of a
# message: found in one Hyperscan pass over the three views (not five passes).
MESSAGE_SETS = ViewSets([(patterns.SET, "key"), *injection.SETS, *spam.SETS])
_INJECTION = slice(1, 1 + len(injection.SETS))  # their candidates in a scan's
_SPAM = slice(_INJECTION.stop, _INJECTION.stop + len(spam.SETS))


def prepare() -> None:
    """Build the one-pass scanner of :data:`MESSAGE_SETS` now (seconds; off the loop)."""
    MESSAGE_SETS.prepare()


@dataclass(slots=True)
class _Run:
    """One message's trip through the input filters."""

    message: IncomingMessage
    policy: ModerationPolicy
    text: Normalised
    out_text: str
    findings: list[Finding] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    # The classifier's scores, by category: rounded into the audit entry's scores (as
    # ``classifier:insult``, ...) only if there is one.
    classified: Mapping[str, float] | None = None
    muted_for: float = 0.0
    # The text's words' key, and MESSAGE_SETS' candidates in the message (None without
    # Hyperscan), once scanned (see _Run.scan).
    scanned: bool = False
    key: str = ""
    candidates: Sequence[Sequence[int]] | None = None

    @classmethod
    def of(cls, message: IncomingMessage, policy: ModerationPolicy, *,
           findings: list[Finding] | None = None, muted_for: float = 0.0) -> _Run:
        """The run of ``message``, its text normalised."""
        text = normalise(message.text)
        return cls(message, policy, text, text.clean,
                   findings=[] if findings is None else findings, muted_for=muted_for)

    def scan(self) -> Sequence[Sequence[int]] | None:
        """MESSAGE_SETS' candidates in the message, scanned at the first filter that
        asks (None without Hyperscan); sets :attr:`key`."""
        if not self.scanned:
            text = self.text
            self.key = key = text.key
            self.candidates = MESSAGE_SETS.scan(
                {"key": key, "clean": text.clean, "lower": text.clean.lower()})
            self.scanned = True
        return self.candidates


# A filter either computes and returns None, or returns what to await (see _Step).
_Filter = Callable[[_Run, "_Channel"], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class _Step:
    """One input filter as a channel runs it. Filters that only compute run inline (a
    timeout could not interrupt them anyway); what they return to await (a pluggable
    classifier, flood counters in Redis) runs under ``timeout``, if one is set."""

    name: str
    run: _Filter
    timeout: float | None


@dataclass(slots=True)
class _Channel:
    """A channel's policy with its filters built."""

    policy: ModerationPolicy
    terms: TermFilter
    pii: PiiDetector
    limits: Limits
    steps: tuple[_Step, ...]
    score_now: Scorer | None  # the classifier's inline scorer, if any
    classifier: Classifier
    flood: _Step | None = None  # the flood step, if the policy has one (admit() runs it)
    score_normalised: Callable[[Normalised], Mapping[str, float]] | None = None  # if it has one
    # thresholds, kept with the classifier's mapping they were made from.
    _thresholds: tuple[object, dict[str, float]] | None = None

    @property
    def thresholds(self) -> dict[str, float]:
        """By category: the policy's over the classifier's own (known once started)."""
        own = getattr(self.classifier, "thresholds", {})
        kept = self._thresholds
        if kept is None or kept[0] is not own:
            kept = self._thresholds = (own, {**own, **self.policy.thresholds})
        return kept[1]


class InputChecks:
    """:class:`~core.moderation.moderator.FilterModerator`'s input side; the moderator
    holds what it uses (below) and builds the channels (:meth:`_channel`)."""

    settings: BotSettings
    state: ModerationState
    classifiers: dict[str, Classifier]
    counts: Counter[str]
    auditor: Auditor
    max_chars: int
    _admitted: dict[tuple[str, str, str, str], Admission]

    if TYPE_CHECKING:
        def _channel(self, channel: str) -> _Channel: ...

        async def _record(self, entry: dict[str, str], user: str, decision: Decision
                          ) -> None: ...

    def _steps(self, policy: ModerationPolicy, score_now: Scorer | None) -> tuple[_Step, ...]:
        filters: dict[str, _Filter] = {
            "size": self._size, "terms": self._terms, "pii": self._pii,
            "injection": self._injection, "spam": self._spam, "flood": self._flood,
            "classifier": self._classifier if score_now is None
            else partial(self._classifier_now, score_now),
        }
        # Timed: what waits on something else (in-process flood state never does).
        timed = {"classifier"} if score_now is None else set()
        if not getattr(self.state, "in_process", False):
            timed.add("flood")
        steps = []
        for name in policy.input_filters:
            if name not in filters:
                raise_unknown(self.settings.source, "input_filters", name, filters)
            steps.append(_Step(name, filters[name],
                               policy.filter_timeout if name in timed else None))
        return tuple(steps)

    # -- input ---------------------------------------------------------------------------

    async def check_input(self, message: IncomingMessage) -> Verdict:
        """Run the channel's input filters and decide; see the module docstring."""
        channel = self._channel(message.channel)
        text = normalise(message.text)  # (_Run.of's work, without its call: every message)
        run = _Run(message, channel.policy, text, text.clean)
        for step in channel.steps:
            try:
                waiting = step.run(run, channel)
                if waiting is None:
                    continue
                if step.timeout is None:  # in-process flood state: no timer to set up
                    await waiting
                else:
                    async with asyncio.timeout(step.timeout):
                        await waiting
            except Exception as exc:
                self._failed(run, step.name, exc)
                if channel.policy.fail_input == "closed":
                    run.findings.append(Finding("failure", step.name))
                    break
        # A plain allow (most messages) is decided without _decide's coroutine.
        allowed = self._allowed(run)
        return allowed if allowed is not None else await self._decide(run)

    def _failed(self, run: _Run, name: str, exc: Exception) -> None:
        log.warning("moderation: bot %s: filter %s failed (%s mode): %s: %s",
                    self.settings.bot.name, name, run.policy.fail_input,
                    type(exc).__name__, str(exc)[:200])
        self.counts[f"failure:{name}"] += 1
        run.degraded.append(name)

    def _size(self, run: _Run, channel: _Channel) -> None:
        # One limit: the bot's (the engine refuses longer messages first), unless a
        # channel sets a lower one.
        limit = min(run.policy.max_chars or self.max_chars, self.max_chars)
        if len(run.text.clean) > limit:
            run.findings.append(Finding("size", str(limit), len(run.text.clean), "size"))

    def _terms(self, run: _Run, channel: _Channel) -> None:
        found = run.scan()
        hit = channel.terms.find_in_message(
            run.text, (run.key, found[0]) if found is not None else None)
        if hit is not None:
            run.findings.append(Finding(hit.category, f"terms:{hit.term}", source="terms"))

    async def _classifier(self, run: _Run, channel: _Channel) -> None:
        classifier = self.classifiers[run.policy.classifier]
        self._classified(run, channel, await classifier.score(
            channel.terms.strip_allowed_message(run.text)))

    def _classifier_now(self, score_now: Scorer, run: _Run, channel: _Channel) -> None:
        text = channel.terms.strip_allowed_message(run.text)
        scores_normalised = channel.score_normalised
        if text is run.text.clean and scores_normalised is not None:
            self._classified(run, channel, scores_normalised(run.text))  # normalised once
        else:
            self._classified(run, channel, score_now(text))

    def _classified(self, run: _Run, channel: _Channel, scores: float | Mapping[str, float]
                    ) -> None:
        thresholds = channel.thresholds
        default = run.policy.classifier_threshold
        run.classified = by_category(scores)
        for category, score in run.classified.items():
            if score >= thresholds.get(category, default):
                run.findings.append(Finding(category, "classifier", score, "classifier"))

    def _pii(self, run: _Run, channel: _Channel) -> None:
        spans = channel.pii.find(run.out_text)
        if spans:
            kinds = sorted({s.kind for s in spans})
            finding = Finding("pii", "+".join(kinds), float(len(spans)), "pii")
            run.findings.append(finding)
            if Action(run.policy.actions.get("pii", "mask")) is not Action.ALLOW:
                run.out_text = PiiDetector.mask(run.out_text, spans)

    def _injection(self, run: _Run, channel: _Channel) -> None:
        found = run.scan()
        report = check_injection(run.message.text, run.text,
                                 candidates=found[_INJECTION] if found is not None else None)
        if report.score:
            run.scores["injection"] = report.score
        if report.score >= run.policy.injection_threshold:
            run.findings.append(Finding("injection", "+".join(report.signals), report.score,
                                        "injection"))

    def _spam(self, run: _Run, channel: _Channel) -> None:
        found = run.scan()
        why = check_spam(run.text.clean, run.key,
                         candidates=found[_SPAM] if found is not None else None)
        if why is not None:
            run.findings.append(Finding("spam", why, source="spam"))

    async def admit(self, message: IncomingMessage) -> Verdict | None:
        """Flood control before the conversation's lane (see :class:`Moderator`): over the
        limits, and with a policy that refuses floods, the refusal is decided, scored and
        audited as a ``flood`` finding of :meth:`check_input` was; a muted sender is
        answered with the mute reply (decided and audited as :meth:`check_input` did,
        without running the filters), not after waiting in the lane -- unless the message
        is shaped like a command (``/name``): the bot's commands stay open to a muted user
        (``/forget``, and the engine checks only a command's arguments), within the flood
        limits as any message is (the engine runs no filter on a bare command, so this is
        the only count it meets). A message let on leaves its count for its ``flood``
        step, so it is counted once. If the count fails, the flood step tries again for a
        message; a command is refused now when the policy fails closed.
        """
        channel = self._channel(message.channel)
        step = channel.flood
        if step is None:
            return None
        try:
            async with asyncio.timeout(step.timeout):
                admission = await self._count(message, channel)
        except Exception as exc:
            if channel.policy.fail_input == "open" or not message.text.startswith("/"):
                return None  # the flood step tries again, and fails open or closed as set
            # Failing closed: a command is refused now, as its flood step would refuse a
            # message (a bare command meets no filter after this).
            run = _Run.of(message, channel.policy, findings=[Finding("failure", step.name)])
            self._failed(run, step.name, exc)
            return await self._decide(run)
        if admission.muted_for > 0 and not message.text.startswith("/"):
            return await self._decide(
                _Run.of(message, channel.policy, muted_for=admission.muted_for))
        limits = channel.limits
        # Within the limits (most messages) is asked first: the policy only beyond them.
        # A muted sender's command is held to them too: a bare one is checked nowhere else.
        if ((admission.user_count <= limits.user_rate
             and admission.conversation_count <= limits.conversation_rate)
                or base_action(channel.policy, [_flood_finding(admission)]).action.answers):
            key = _admitted_key(message)
            if not admission.repeated or key not in self._admitted:
                # A copy admitted while the first waits keeps the first's count for it.
                self._admitted[key] = admission
            while len(self._admitted) > _ADMITTED_MAX:
                del self._admitted[next(iter(self._admitted))]
            return None
        return await self._decide(
            _Run.of(message, channel.policy, findings=[_flood_finding(admission)]))

    def _count(self, msg: IncomingMessage, channel: _Channel, *, once: bool = True
               ) -> Awaitable[Admission]:
        # Counted once per message id (``once``): a redelivery (admitted before the
        # engine's dedupe sees it) is not counted again.
        return self.state.admit(
            f"{msg.channel}:{msg.user_id}", f"{msg.channel}:{msg.conversation_id}",
            channel.limits,
            message=message_member(msg.conversation_id, msg.message_id) if once else None)

    def _flood(self, run: _Run, channel: _Channel) -> Awaitable[None] | None:
        # Counted by admit() (the usual case): decided here, nothing to wait for (and no
        # timer to set); otherwise counted now, under the step's timeout.
        admission = self._admitted.pop(_admitted_key(run.message), None)
        if admission is None or admission.repeated:  # a direct call, or counted before
            return self._flood_counted(run, channel, admission)
        self._flooded(run, channel, admission)
        return None

    async def _flood_counted(self, run: _Run, channel: _Channel,
                             admission: Admission | None) -> None:
        if admission is None:
            admission = await self._count(run.message, channel)
        if admission.repeated:
            # The engine runs this step only for a message it is about to answer (a
            # replay of a stored answer never gets here), so an id counted before is an
            # attempt that ended unanswered (the client hung up, a failure) sent again:
            # each attempt counts, or one id would buy unlimited generations.
            admission = await self._count(run.message, channel, once=False)
        self._flooded(run, channel, admission)

    def _flooded(self, run: _Run, channel: _Channel, admission: Admission) -> None:
        run.muted_for = admission.muted_for
        if (admission.user_count > channel.limits.user_rate
                or admission.conversation_count > channel.limits.conversation_rate):
            run.findings.append(_flood_finding(admission))

    def _allowed(self, run: _Run) -> Verdict | None:
        if not run.findings and not run.degraded and run.muted_for <= 0:
            # A plain allow (most messages): no points, no audit, no reply.
            self.counts["action:allow"] += 1
            return Verdict(Action.ALLOW, run.out_text, None, None, ())
        return None

    async def _decide(self, run: _Run) -> Verdict:
        """The verdict on a run that is no plain allow (see :meth:`_allowed`)."""
        msg, policy = run.message, run.policy
        user = f"{msg.channel}:{msg.user_id}"
        if run.muted_for > 0:
            decision = Decision(Action.MUTE, [Finding("muted", score=run.muted_for)])
        else:
            decision = base_action(policy, run.findings)
            if decision.points > 0:
                try:
                    async with asyncio.timeout(policy.filter_timeout):
                        score = await self.state.add_points(user, decision.points,
                                                            policy.half_life)
                except Exception as exc:
                    self._failed(run, "score", exc)
                else:
                    decision = apply_score(policy, decision, score)
        self.counts[f"action:{decision.action}"] += 1
        if decision.action is not Action.ALLOW or run.degraded:
            scores = run.scores
            if run.classified is not None:  # (the entry rounds every score)
                scores = {**{f"classifier:{c}": s for c, s in run.classified.items()},
                          **scores}
            entry = self.auditor.entry(msg, "input", decision, run.text.clean,
                                       degraded=tuple(run.degraded), scores=scores)
            await self._record(entry, user, decision)
        for category in {f.kind for f in decision.findings}:
            self.counts[f"category:{category}"] += 1
        text = run.out_text if decision.action.answers else ""
        reason = ",".join(f.label() for f in decision.findings) or None
        return Verdict(decision.action, text, reply_for(policy, decision, run.muted_for), reason,
                       tuple(sorted({f.kind for f in decision.findings})))


# Counts taken by admit() wait here for the message's flood step; a message refused
# between the two (a full lane, a redelivery) leaves its count, dropped oldest first.
_ADMITTED_MAX = 10_000


def _flood_finding(admission: Admission) -> Finding:
    return Finding("flood", score=float(admission.user_count), source="flood")


def _admitted_key(message: IncomingMessage) -> tuple[str, str, str, str]:
    return (message.channel, message.conversation_id, message.user_id, message.message_id)


def raise_unknown(source: str, key: str, name: str, known: Mapping[str, object]) -> None:
    """A configuration error for an unknown filter name."""
    from core.errors import ConfigError

    choices = ", ".join(sorted(known))
    raise ConfigError(f"{source}: moderation.{key}: unknown filter {name!r} (known: {choices})")

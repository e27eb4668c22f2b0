"""From findings to an action: severity, violation points, the warn -> mute ladder.

Each filter that objects reports a :class:`Finding` of a category (``insult``,
``threat``, ``injection``, ...). The channel's policy maps each finding to an action and
to violation points -- by the filter's name if the policy names it (``actions = { terms =
"mute" }``), by category otherwise; the most severe action wins. Points
go on the user's decaying score, and a high score makes the action harsher: a refusal
carries a warning past ``warn_at``, the user is muted past ``mute_at`` and the case goes
to people past ``escalate_at`` -- like Discord AutoMod's timeouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.config import ModerationPolicy
from core.moderation.base import Action

SEVERITY = {
    Action.ALLOW: 0, Action.MASK: 1, Action.WARN: 2, Action.BLOCK: 3, Action.MUTE: 4,
    Action.ESCALATE: 5,
}


# When findings of several categories call for a refusal, the reply speaks to the first
# of these: care for someone in distress comes before anything else.
REPLY_ORDER = ("selfharm", "threat", "hate", "sexual", "insult", "injection", "spam", "leak")


@dataclass(frozen=True, slots=True)
class Finding:
    """One filter's objection: its category (``kind``), a detail, a score, the filter."""

    kind: str
    detail: str = ""
    score: float = 1.0
    source: str = ""  # the filter that found it ("terms", "classifier", ...)

    def label(self) -> str:
        """``kind`` or ``kind:detail``, for the audit log (never the user's text)."""
        return f"{self.kind}:{self.detail}" if self.detail else self.kind


def _setting(table: dict[str, Any], finding: Finding, default: Any) -> Any:
    """A finding's entry in ``actions`` / ``points``: by filter if named, else category."""
    if finding.source and finding.source in table:
        return table[finding.source]
    return table.get(finding.kind, default)


@dataclass(slots=True)
class Decision:
    """What to do with a message, and why."""

    action: Action
    findings: list[Finding] = field(default_factory=list)
    points: float = 0.0
    violation_score: float = 0.0
    warned: bool = False
    mute_seconds: float = 0.0
    escalate: bool = False


def base_action(policy: ModerationPolicy, findings: Sequence[Finding]) -> Decision:
    """The action and points the findings call for, before the user's history counts."""
    action = Action.ALLOW
    points = 0.0
    for finding in findings:
        chosen = Action(_setting(policy.actions, finding, "block"))
        if SEVERITY[chosen] > SEVERITY[action]:
            action = chosen
        if chosen is not Action.ALLOW:
            # One message is one offence, however many filters object to it.
            points = max(points, float(_setting(policy.points, finding, 0.0)))
    return Decision(action, list(findings), points)


def apply_score(policy: ModerationPolicy, decision: Decision, score: float) -> Decision:
    """Harden ``decision`` by the user's violation ``score`` (the ladder above)."""
    decision.violation_score = score
    if decision.points <= 0:
        return decision
    if score >= policy.escalate_at:
        decision.action = Action.ESCALATE
        decision.escalate = True
        decision.mute_seconds = policy.mute_seconds
    elif score >= policy.mute_at and SEVERITY[decision.action] < SEVERITY[Action.MUTE]:
        decision.action = Action.MUTE
    elif score >= policy.warn_at:
        decision.warned = True
        if SEVERITY[decision.action] < SEVERITY[Action.WARN]:
            decision.action = Action.WARN
    if decision.action is Action.MUTE:
        decision.mute_seconds = policy.mute_seconds
    if decision.action is Action.ESCALATE:
        decision.escalate = True
    return decision


def reply_for(policy: ModerationPolicy, decision: Decision, muted_for: float = 0.0) -> str | None:
    """What the user is told, for actions that don't answer (and the WARN notice)."""
    kinds = {f.kind for f in decision.findings}
    action = decision.action
    if action is Action.WARN:
        return policy.warn_notice
    if action is Action.MUTE:
        seconds = muted_for or decision.mute_seconds
        return policy.mute_reply.format(minutes=max(1, round(seconds / 60)))
    if action is Action.ESCALATE:
        return policy.escalate_reply
    if action is Action.BLOCK:
        if "failure" in kinds:
            reply = policy.failure_reply
        elif "size" in kinds:
            size = next(f for f in decision.findings if f.kind == "size")
            reply = policy.size_reply.format(chars=int(size.score), limit=size.detail)
        elif kinds == {"flood"}:
            reply = policy.flood_reply
        else:
            reply = category_reply(policy, kinds)
        return f"{reply} {policy.warn_notice}" if decision.warned else reply
    return None


def category_reply(policy: ModerationPolicy, kinds: set[str]) -> str:
    """The reply for a refusal of these categories (``replies``, else ``block_reply``)."""
    for kind in REPLY_ORDER:
        if kind in kinds and kind in policy.replies:
            return policy.replies[kind]
    for kind in sorted(kinds):
        if kind in policy.replies:
            return policy.replies[kind]
    return policy.block_reply

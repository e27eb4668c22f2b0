"""The filtering moderator: the input pipeline (:mod:`core.moderation.input`), the output
guard, actions and audit.

Input filters run in the order the channel's policy names them (by default
size -> terms -> classifier -> pii -> injection -> spam -> flood) on the normalised
message; each objection is a :class:`~core.moderation.policy.Finding` of a category
(insult, threat, hate, sexual, selfharm, spam, pii, injection), and the policy turns the
findings and the user's violation score into one action. Every decision other than a
plain allow, and every degraded one, goes to the audit log.

Fail modes: a filter that raises or runs past ``filter_timeout`` is logged and counted;
on input, ``fail_input = "open"`` carries on without it (the blocklist, which cannot
fail, still applies) and ``"closed"`` refuses the message; on output,
``fail_output = "closed"`` withholds the reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import BotSettings
from core.lifecycle import ServiceBase
from core.moderation.audit import Auditor
from core.moderation.base import PassThroughGuard, ReplyGuard
from core.moderation.classifier import Classifier, classifiers, scorer_now
from core.moderation.guard import OutputGuard, guarded
from core.moderation.input import InputChecks, _Channel, raise_unknown
from core.moderation.input import prepare as input_prepare
from core.moderation.normalise import confusables
from core.moderation.output import OUTPUT_FILTERS, GuardConfigs, guard_report
from core.moderation.pii import PiiDetector
from core.moderation.policy import Decision
from core.moderation.state import Admission, Limits, MemoryState, ModerationState
from core.moderation.terms import TermFilter
from core.types import IncomingMessage

if TYPE_CHECKING:
    from core.redis_client import RedisHub

log = logging.getLogger(__name__)


class FilterModerator(InputChecks, ServiceBase):
    """A :class:`~core.moderation.base.Moderator` of configurable filters; see module doc."""

    def __init__(
        self, settings: BotSettings, *, state: ModerationState | None = None,
        classifier: Classifier | None = None,
    ) -> None:
        self.settings = settings
        self.section = settings.moderation
        self.state = state if state is not None else make_state(settings)
        names = {self.section.classifier} | {p.classifier for p in self.section.channels.values()}
        registry = classifiers()
        where = f"{settings.source}: moderation.classifier"
        self.classifiers: dict[str, Classifier] = {
            name: registry.get(name, where=where)(settings) for name in sorted(names)
        }
        self.max_chars = settings.bot.max_message_chars
        if classifier is not None:
            self.classifiers = dict.fromkeys(self.classifiers, classifier)
        self.auditor = Auditor(settings.bot.name, self.section.audit_key)
        self.counts: Counter[str] = Counter()  # "action:block", "failure:classifier", ...
        self._base = Path(settings.source).parent if settings.source != "<memory>" else None
        self._channels: dict[str, _Channel] = {}
        self._admitted: dict[tuple[str, str, str, str], Admission] = {}
        self._guards = GuardConfigs(self._channel)
        for channel in ("", *self.section.channels):
            policy = self._channel(channel).policy  # checks the input filters' names
            for name in policy.output_filters:
                if name not in OUTPUT_FILTERS:
                    raise_unknown(settings.source, "output_filters", name,
                                  dict.fromkeys(OUTPUT_FILTERS))

    def share_redis(self, hub: RedisHub) -> None:
        """Keep the state in ``hub``'s Redis connections (see ``core.redis_client``)."""
        from core.redis_client import SharesRedis  # (a hub exists: redis is loaded)

        if isinstance(self.state, SharesRedis):  # RedisState; not MemoryState
            self.state.share_redis(hub)

    async def _start(self) -> None:
        # The confusables table is read and the pattern scanners are compiled once (about
        # two seconds for the first moderator of a process), here, not on the first message.
        await asyncio.to_thread(self._prepare)
        await self.state.start()
        for classifier in set(self.classifiers.values()):
            await classifier.start()

    def _prepare(self) -> None:
        confusables()
        input_prepare()
        for channel in self._channels.values():
            channel.terms.prepare()

    async def _stop(self) -> None:
        for classifier in set(self.classifiers.values()):
            try:
                await classifier.stop()
            except Exception:
                log.exception("moderation: stopping a classifier failed")
        await self.state.stop()

    def _channel(self, channel: str) -> _Channel:
        built = self._channels.get(channel)
        if built is None:
            policy = self.section.for_channel(channel)
            classifier = self.classifiers[policy.classifier]
            score_now = scorer_now(classifier)
            built = self._channels[channel] = _Channel(
                policy,
                TermFilter.from_policy(
                    policy.blocklist, policy.allowlist, policy.blocklist_files,
                    policy.allowlist_files, builtin=policy.builtin_terms, base=self._base,
                ),
                PiiDetector(policy.pii),
                Limits(policy.user_rate, policy.user_window, policy.conversation_rate,
                       policy.conversation_window),
                self._steps(policy, score_now),
                score_now,
                classifier,
            )
            built.flood = next((s for s in built.steps if s.name == "flood"), None)
            built.score_normalised = getattr(classifier, "score_normalised", None)
        return built

    async def _record(self, entry: dict[str, str], user: str, decision: Decision) -> None:
        try:
            await self.state.record(entry, mute_user=user, mute_seconds=decision.mute_seconds,
                                    escalate=decision.escalate)
        except Exception as exc:
            # The decision stands; the log line carries what the audit entry would have.
            self.counts["failure:audit"] += 1
            log.warning("moderation: audit write failed (%s); entry: %s",
                        type(exc).__name__, entry)

    # -- output --------------------------------------------------------------------------

    def guard(
        self, message: IncomingMessage, stream: AsyncIterator[str], *, system: str = ""
    ) -> AsyncIterator[str]:
        """The reply stream, checked before release; see :mod:`core.moderation.guard`.

        ``system`` is the request's system text (persona, plugin instructions): a reply
        that recites it is withheld (the ``leak`` output filter).
        """
        guard = self._output_guard(message, system)
        return stream if guard is None else guarded(stream, guard)

    def output_guard(self, message: IncomingMessage, *, system: str = "") -> ReplyGuard | None:
        """:meth:`guard` fed synchronously (see ``Moderator.output_guard``)."""
        guard = self._output_guard(message, system)
        if guard is None:
            return PassThroughGuard()
        return None if guard.awaits else guard

    def _output_guard(self, message: IncomingMessage, system: str) -> OutputGuard | None:
        config = self._guards.get(message.channel, system, keep=self.started)
        if config is None:
            return None
        return OutputGuard(config, guard_report(message, self.counts, self.auditor, self._record))


def make_state(settings: BotSettings) -> ModerationState:
    """The state backend the settings call for (see ``ModerationSection``)."""
    section = settings.moderation
    use_redis = section.state == "redis" or (
        section.state == "auto" and settings.memory.backend == "redis"
    )
    if not use_redis:
        return MemoryState(audit_max_entries=section.audit_max_entries,
                           audit_retention=section.audit_retention)
    from core.moderation.state_redis import RedisState

    return RedisState(
        section.url or settings.memory.url,
        prefix=section.key_prefix or settings.memory.key_prefix,
        bot=settings.bot.name,
        timeout=settings.memory.timeout,
        audit_max_entries=section.audit_max_entries,
        audit_retention=section.audit_retention,
    )

"""The conversation engine: one message in, a stream of reply events out.

The pipeline of DESIGN.md, each stage a method and each collaborator passed in:

    validate -> admit -> lane -> claim (dedupe + lease + load memory: one call)
    -> moderate input -> commands / pre-hooks -> build request -> generate
    -> guard output -> finish (append memory + dedupe record + release: one call)

Messages of one conversation are answered in arrival order (:mod:`core.lanes`: a FIFO
lane per conversation in this process, a lease across front ends); different
conversations run concurrently. A message id is pending while it is answered and done
once its reply is stored: a redelivery gets the stored reply again, and any failure
releases the id so that a retry is answered. Failures of memory, the generator or a
plugin become a short apology to the user, a log line and a counter.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from prometheus_client import Counter

from core.config import BotSettings
from core.errors import (
    GenerationError,
    GeneratorBusy,
    InvalidMessage,
    MemoryUnavailable,
)
from core.generation.base import GenerationRequest, Generator, SamplingParams, TokenDelta
from core.lanes import Claim, Lanes, Renewals, SlowDown
from core.lifecycle import Service, ServiceBase
from core.memory.base import MemorySnapshot, MemoryStore, StoredReply
from core.metrics import Metrics
from core.moderation.base import (
    Action,
    Moderator,
    PassThroughGuard,
    ReplyGuard,
    ReplyWithheld,
    Verdict,
)
from core.outcomes import Apologies, collect, plugin_failure_counter
from core.outcomes import outcome as outcome_of
from core.plugin_runner import Before, PluginFailed, PluginRunner
from core.plugins import AddContext, PluginRegistry
from core.prompt import HistoryMessages, chat_messages, instructions
from core.streams import guarded_attempts
from core.types import IncomingMessage, ReplyEvent, ReplyKind, Turn
from core.validation import clean_text

if TYPE_CHECKING:
    from core.redis_client import RedisHub

log = logging.getLogger(__name__)

# Looked up once: reading a member off an enum class (or Action.answers, which reads
# three) costs more than building an event, and these are read for every message.
_TYPING, _DELTA, _RESET, _FINAL = (
    ReplyKind.TYPING, ReplyKind.DELTA, ReplyKind.RESET, ReplyKind.FINAL)
_ALLOW, _WARN = Action.ALLOW, Action.WARN
_ANSWERING = tuple(action for action in Action if action.answers)


class Engine(ServiceBase):
    """Answers messages from any channel; see the module docstring.

    Starting the engine starts its memory store, moderator (if it is a service) and
    generator, in that order, and stopping it stops them in reverse.
    """

    def __init__(
        self,
        settings: BotSettings,
        *,
        memory: MemoryStore,
        generator: Generator,
        moderator: Moderator,
        plugins: PluginRegistry,
        metrics: Metrics | None = None,
        apologies: Apologies | None = None,
        redis: RedisHub | None = None,
    ) -> None:
        self.settings = settings
        # The process's shared Redis connections (core.app), for adapters' own stores.
        self.redis = redis
        self.memory = memory
        self.generator = generator
        self.moderator = moderator
        self.plugins = plugins
        self.metrics = metrics or Metrics()
        # Bound once: prometheus_client's labels() takes a lock and builds a key on
        # every call, and these are counted for every message.
        self._reply_seconds = self.metrics.reply_seconds.labels(self.name)
        self._first_token_seconds = self.metrics.first_token_seconds.labels(self.name)
        self._outcomes: dict[tuple[str, str], Counter] = {}
        self.apologies = apologies or Apologies()
        self.lanes = Lanes(max_queued=settings.bot.max_queued,
                           max_in_flight=settings.bot.max_in_flight_per_user)
        self.runner = PluginRunner(plugins, memory, timeout=settings.plugins.timeout)
        gen = settings.generation
        self._sampling = SamplingParams(
            max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
            repetition_penalty=gen.repetition_penalty,
            no_repeat_ngram_size=gen.no_repeat_ngram_size,
            finish_sentence=gen.finish_sentence, max_sentences=gen.max_sentences,
        )
        self._history = HistoryMessages()
        self._ids = unique_ids()
        self._renewals = Renewals(settings.memory.lease)

    @property
    def name(self) -> str:
        """The bot's name."""
        return self.settings.bot.name

    async def _start(self) -> None:
        await self.memory.start()
        if isinstance(self.moderator, Service):
            await self.moderator.start()
        await self.generator.start()
        await self.plugins.start()

    async def _stop(self) -> None:
        try:
            await self.plugins.stop()
        finally:
            await self._stop_parts()

    async def _stop_parts(self) -> None:
        try:
            await self.generator.stop()
        finally:
            try:
                if isinstance(self.moderator, Service):
                    await self.moderator.stop()
            finally:
                await self.memory.stop()

    async def handle(self, message: IncomingMessage) -> AsyncIterator[ReplyEvent]:
        """The reply to ``message`` as a stream of events, ending in FINAL, NOTICE or ERROR.

        Closing the stream early cancels the generation; nothing is stored then.

        One async generator, down to the generator's deltas: every level of them would
        cost each event of every message (and each word's turn of the event loop).
        """
        started = time.monotonic()
        outcome = "error"
        last: ReplyEvent | None = None  # the events that end the stream, as they go out
        try:
            try:
                text = clean_text(message.text, self.settings.bot.max_message_chars)
            except InvalidMessage as exc:
                outcome = "invalid"
                yield ReplyEvent(ReplyKind.ERROR, exc.reason, code="invalid_input")
                return
            if text != message.text:
                message = replace(message, text=text)
            try:
                lane = await self.lanes.hold(message, self._admit)
                entered = message  # the lane is left as it was held (message changes below)
                try:
                    claim = Claim(self.memory, message, self._ids(), self.settings.memory.lease,
                                  self._renewals)
                    shown: list[str] = []  # the pieces of the reply the user was shown
                    guard: ReplyGuard | None = None  # fed here (None: nothing to feed)
                    try:
                        ready = await self._prepare(message, claim)
                        if isinstance(ready, ReplyEvent):  # a replay, a refusal, a command
                            last = ready
                            yield ready
                            return
                        message, verdict, request, history = ready
                        action = verdict.action
                        yield ReplyEvent(_TYPING, "", action)
                        deltas, guard = self._guarded(message, request)
                        try:
                            async for delta in deltas:
                                if delta.restart:
                                    # A remote worker died mid-reply and another started
                                    # over: the user is told to drop what they saw, so
                                    # they see one answer.
                                    guard = self._restarted(message, request, guard)
                                    if shown:
                                        shown.clear()
                                        yield ReplyEvent(_RESET, "", action)
                                text = delta.text
                                if not text:
                                    continue
                                for piece in (text,) if guard is None else guard.feed(text):
                                    if not shown:
                                        self._first_shown(message)
                                    shown.append(piece)
                                    yield ReplyEvent(_DELTA, piece, action)
                        finally:
                            # Closed here, not with core.streams.closing: a context
                            # manager's object and two coroutines, for every message.
                            aclose = getattr(deltas, "aclose", None)
                            if aclose is not None:
                                await aclose()
                        if guard is not None:
                            for piece in guard.finish():
                                if not shown:
                                    self._first_shown(message)
                                shown.append(piece)
                                yield ReplyEvent(_DELTA, piece, action)
                            await guard.flush()
                        ending = await self._answered(message, claim, verdict, shown, history)
                    except ReplyWithheld as withheld:
                        if guard is not None:
                            await guard.flush()  # the audit log's entry
                        ending = await self._withheld(message, claim, withheld, bool(shown))
                    except (MemoryUnavailable, GenerationError, PluginFailed) as exc:
                        ending = [self._failure(message, exc)]
                    finally:
                        if not claim.settled:  # a failure, or the stream closed early
                            await claim.release()
                    for last in ending:
                        yield last
                finally:
                    # Held and let go without a context manager (Lanes.enter): its object
                    # and two coroutines, for every message.
                    self.lanes.leave(lane, entered)
            except SlowDown as exc:
                outcome = "slow_down"
                log.debug("bot %s: refused before the lane: %s", self.name, exc)
                if exc.notice:  # a muted sender: told as after the lane, without waiting
                    last = ReplyEvent(ReplyKind.NOTICE, exc.reply or "",
                                      action=Action(exc.action), code="moderated")
                    yield last
                else:
                    yield ReplyEvent(ReplyKind.ERROR, exc.reply or self.apologies.slow_down,
                                     action=exc.action, code="slow_down")
        finally:
            if last is not None and last.is_last:
                outcome = outcome_of(last)
            counted = self._outcomes.get((message.channel, outcome))
            if counted is None:
                counted = self._outcomes[message.channel, outcome] = self.metrics.messages.labels(
                    self.name, message.channel, outcome)
            counted.inc()
            if outcome in ("answered", "command"):
                self._reply_seconds.observe(time.monotonic() - started)

    async def _admit(self, message: IncomingMessage) -> SlowDown | None:
        """Moderation's rate limits, asked before the message waits for its turn: a
        refusal (counted like any moderation decision), or None."""
        verdict = await self.moderator.admit(message)
        if verdict is None:
            return None
        self._count_verdict(message, verdict)
        return SlowDown(f"{message.key}: moderation refused it ({verdict.reason})",
                        reply=verdict.reply, action=verdict.action.value,
                        notice="flood" not in verdict.categories)

    def _count_verdict(self, message: IncomingMessage, verdict: Verdict) -> None:
        if verdict.action is not _ALLOW:
            self.metrics.moderation.labels(
                self.name, message.channel, "input", verdict.action.value).inc()
        for category in verdict.categories:
            self.metrics.moderation_categories.labels(
                self.name, message.channel, "input", category).inc()

    def _guarded(
        self, message: IncomingMessage, request: GenerationRequest
    ) -> tuple[AsyncIterator[TokenDelta], ReplyGuard | None]:
        """The generator's deltas for ``request``, and the output guard to feed them to
        (None: they are shown as they come). The engine feeds the guard itself, each
        delta as it comes: no stream of its own (a level for every event and every
        word's turn of the event loop). A guard that must await a filter (an external
        classifier) is the moderator's async one, over the deltas."""
        deltas = self.generator.stream(request)
        system = instructions(message.text, request.messages)
        guard = self.moderator.output_guard(message, system=system)
        if guard is None:
            return guarded_attempts(
                deltas, partial(self.moderator.guard, message, system=system)), None
        return deltas, None if isinstance(guard, PassThroughGuard) else guard

    def _restarted(
        self, message: IncomingMessage, request: GenerationRequest, guard: ReplyGuard | None
    ) -> ReplyGuard | None:
        """The guard for a new attempt of the generator (a remote job reclaimed after its
        worker died): a fresh one, so nothing held back from the abandoned attempt shows.
        What that held is checked as ever, though, and may still withhold the reply."""
        if guard is None:
            return None
        guard.finish()
        system = instructions(message.text, request.messages)
        return self.moderator.output_guard(message, system=system)

    def _first_shown(self, message: IncomingMessage) -> None:
        self._first_token_seconds.observe(time.time() - message.received_at)

    async def _answered(
        self, message: IncomingMessage, claim: Claim, verdict: Verdict, pieces: list[str],
        history: Sequence[Turn],
    ) -> list[ReplyEvent]:
        """The end of a generated reply (all of it shown as ``pieces``): stored, then its
        last events; an apology if it came out empty."""
        action = verdict.action
        reply = "".join(pieces).strip()
        if not reply:
            self.metrics.errors.labels(self.name, "empty_reply").inc()
            return [ReplyEvent(ReplyKind.ERROR, self.apologies.empty, action=action,
                               code="empty_reply")]
        notice = ""
        if action is _WARN and verdict.reply:
            # The warning goes to the user, not into the conversation's memory.
            notice = f"\n\n{verdict.reply}"
        final = ReplyEvent(_FINAL, reply + notice, action)
        await self._finish(message, claim, final, reply)
        self.runner.after(message, reply, history)
        if notice:
            return [ReplyEvent(ReplyKind.DELTA, notice, action=action), final]
        return [final]

    async def _withheld(
        self, message: IncomingMessage, claim: Claim, withheld: ReplyWithheld, shown: bool
    ) -> list[ReplyEvent]:
        """The output guard flagged the reply part-way: what was shown was safe, but the
        answer is replaced as a whole (stored, then its last events)."""
        self.metrics.moderation.labels(
            self.name, message.channel, "output", Action.BLOCK.value).inc()
        for category in withheld.categories:
            self.metrics.moderation_categories.labels(
                self.name, message.channel, "output", category).inc()
        final = ReplyEvent(ReplyKind.FINAL, withheld.text, action=Action.BLOCK,
                           code="moderated")
        await self._finish(message, claim, final, withheld.text)
        return [ReplyEvent(ReplyKind.RESET, action=Action.BLOCK), final] if shown else [final]

    async def _prepare(
        self, message: IncomingMessage, claim: Claim
    ) -> ReplyEvent | tuple[IncomingMessage, Verdict, GenerationRequest, Sequence[Turn]]:
        """Claim, moderate, run commands and pre-hooks: the message's whole answer (a
        replay, a refusal, a command's reply), or what to generate from."""
        # Dedupe, the lease and the conversation's memory in one round trip; a message
        # then refused or answered by a command just leaves the snapshot.
        begun = await claim.begin(time.monotonic() + self.settings.generation.timeout)
        if begun.replay is not None:
            stored = begun.replay
            return ReplyEvent(ReplyKind(stored.kind), stored.text, action=stored.action,
                              code="duplicate")
        assert begun.snapshot is not None
        verdict = await self._check_input(message)
        self._count_verdict(message, verdict)
        if verdict.action not in _ANSWERING:
            refused = ReplyEvent(ReplyKind.NOTICE, verdict.reply or "",
                                 action=verdict.action, code="moderated")
            await self._finish(message, claim, refused)
            if verdict.action is Action.ESCALATE:
                # For plugins that bring people in (handoff).
                await self.plugins.emit("moderation.escalate",
                                        replace(message, text=verdict.text),
                                        {"categories": ",".join(verdict.categories)})
            return refused
        if verdict.text != message.text:
            message = replace(message, text=verdict.text)
        before = await self.runner.before(message)
        if before.reply is not None or before.silent:
            return await self._answer_before(message, verdict, before, claim,
                                             begun.snapshot.turns)
        request = await self.build_request(message, begun.snapshot, before.contexts)
        return message, verdict, request, begun.snapshot.turns

    async def _check_input(self, message: IncomingMessage) -> Verdict:
        """Moderation's verdict on ``message``. A known command's name is the bot's own
        word, so only its arguments are checked (``/bot`` is not an insult, nor
        ``/instructions`` an injection), and a bare command has nothing to check."""
        matched = self.plugins.match_command(message.text)
        if matched is None:
            return await self.moderator.check_input(message)
        command, args = matched
        if not args:
            return Verdict(Action.ALLOW, message.text)
        verdict = await self.moderator.check_input(replace(message, text=args))
        return replace(verdict, text=f"/{command.name} {verdict.text}")

    async def _answer_before(
        self, message: IncomingMessage, verdict: Verdict, before: Before, claim: Claim,
        history: Sequence[Turn] = (),
    ) -> ReplyEvent:
        """The answer of a command or pre-hook, or silence (no turns stored); the event
        is recorded as the message's answer either way, so a redelivery gets it again."""
        if before.silent:
            event = ReplyEvent(ReplyKind.NOTICE, action=verdict.action,
                               code=before.code or "silent")
            await self._finish(message, claim, event)
            return event
        reply = before.reply
        assert reply is not None
        if before.kind == "notice":
            event = ReplyEvent(ReplyKind.NOTICE, reply.text, action=verdict.action,
                               code=before.code, metadata=reply.metadata)
            await self._finish(message, claim, event)
            await self.runner.finally_(before)
            return event
        event = ReplyEvent(ReplyKind.FINAL, reply.text, action=verdict.action,
                           metadata=reply.metadata)
        await self._finish(message, claim, event, reply.text if reply.store else None)
        if reply.store:
            self.runner.after(message, reply.text, history)
        return event

    async def build_request(
        self, message: IncomingMessage, snapshot: MemorySnapshot,
        found: Sequence[AddContext] = (),
    ) -> GenerationRequest:
        """The chat the generator continues: persona and context, history, the message
        (in the order :mod:`core.prompt` gives). ``found`` is what the pre-hooks added;
        the context providers' text follows it, all within the budget.
        """
        contexts = await self.runner.contexts(message, found)
        bot = self.settings.bot
        messages = chat_messages(bot.persona, contexts, snapshot.facts, snapshot.turns,
                                 message.text, bot.examples,
                                 history=self._history(message.key, snapshot.turns))
        return GenerationRequest(
            messages=tuple(messages),
            sampling=self._sampling,
            tenant=self.name,
            user=f"{message.channel}:{message.user_id}",
            request_id=self._ids(),
        )

    async def _finish(
        self, message: IncomingMessage, claim: Claim, event: ReplyEvent,
        reply: str | None = None,
    ) -> None:
        """Store the exchange (when ``reply`` is given: the turn pair) and ``event`` as the
        message's answer, releasing its claim: one atomic call."""
        turns: list[Turn] = []
        if reply is not None:
            turns = [Turn("user", message.text, message.user_id, message.message_id,
                          message.received_at),
                     Turn("assistant", reply)]
        claim.stop_renewing()
        await self.memory.finish(
            message.key, message.message_id, message.user_id, claim.token, turns,
            StoredReply(str(event.kind), event.text, str(event.action), event.code),
        )
        claim.settled = True

    def _failure(
        self, message: IncomingMessage, exc: MemoryUnavailable | GenerationError | PluginFailed
    ) -> ReplyEvent:
        """The apology for what failed behind the bot; logged and counted by stage."""
        apologies = self.apologies
        if isinstance(exc, MemoryUnavailable):
            stage, apology, code = "memory", apologies.memory, "memory_unavailable"
        elif isinstance(exc, GeneratorBusy):
            stage, apology, code = "generation", apologies.busy, "busy"
        elif isinstance(exc, GenerationError):
            stage, apology, code = "generation", apologies.generation, "generation_failed"
        else:
            stage, apology, code = "plugin", apologies.plugin, "plugin_failed"
        log.warning("bot %s: %s failed for %s: %s", self.name, stage, message.key, exc)
        self.metrics.errors.labels(self.name, stage).inc()
        return ReplyEvent(ReplyKind.ERROR, apology, code=code)


def unique_ids() -> Callable[[], str]:
    """A source of ids unique across processes: a random prefix and a count (a claim's
    token, a request's id), without a system call for each."""
    prefix = os.urandom(8).hex()
    count = itertools.count()
    return lambda: f"{prefix}{next(count):x}"


__all__ = ["Apologies", "Engine", "collect", "plugin_failure_counter", "unique_ids"]

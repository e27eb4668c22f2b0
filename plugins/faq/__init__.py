"""The FAQ plugin: answers customer questions from a knowledge base.

    [plugins]
    modules = ["plugins.faq"]
    [plugins.faq]
    file = "support/faq.json"      # relative to the bot's file

Above the direct threshold the entry's answer is the reply, verbatim (the reply event's
metadata names the entry: ``faq_entry``); between the thresholds the best entries go
into the prompt and the model is told to answer only from them; below, the bot says it
does not know and offers a human, and emits ``faq.miss`` (the handoff plugin listens).
Each outcome is counted in ``parley_faq_answers_total``. The model loads when the bot
starts, off the event loop; each question is scored on a worker thread.
"""

from __future__ import annotations

import logging

from core.errors import ConfigError
from core.plugins import AddContext, Plugin, PreHookResult, Reply
from core.threads import in_own_thread
from core.types import IncomingMessage
from plugins.faq.knowledge import Entry, load_entries
from plugins.faq.retrieval import Match, Outcome, Scorer, Vocabulary, decide, scorers
from plugins.faq.settings import FaqSettings

NAME = "faq"
Config = FaqSettings

log = logging.getLogger(__name__)


def setup(registry: Plugin, config: FaqSettings) -> None:
    """Load the knowledge base now (a bad file stops start-up) and the model on start."""
    try:
        entries = load_entries(registry.path(config.file))
    except ConfigError as exc:
        raise ConfigError(f"plugins.faq.file: {exc}") from None
    factory = scorers().get(config.retriever, where="plugins.faq.retriever")
    thresholds = config.thresholds
    vocabulary = Vocabulary(entries)
    scorer: list[Scorer] = []
    metrics = registry.services.metrics

    async def start() -> None:
        # Model work on threads that end (core/threads.py): a lasting thread that ran
        # torch would slow the generation worker's every step.
        scorer.append(await in_own_thread(factory, entries, config.model, name="parley-faq"))

    async def answer(message: IncomingMessage) -> PreHookResult:
        if not scorer:
            return None
        scores, second = await in_own_thread(_opinions, scorer[0], message.text,
                                             name="parley-faq")
        unknown = vocabulary.unknown_share(message.text)
        match = decide(entries, scores, thresholds, top=config.context_entries,
                       second_opinion=second, unknown_share=unknown)
        entry = match.best.id if match.best and match.outcome is not Outcome.ABSTAIN else ""
        if metrics is not None:
            metrics.faq.labels(registry.services.bot, match.outcome.value, entry).inc()
        if match.outcome is Outcome.DIRECT and match.best is not None:
            return Reply(match.best.answer, metadata=_metadata(match))
        if match.outcome is Outcome.CONTEXT:
            return AddContext(_context(config.context_instructions, match))
        await registry.emit("faq.miss", message, {"score": match.score})
        return Reply(config.unknown_reply, metadata=_metadata(match))

    registry.on_start(start)
    registry.add_pre_hook(answer)


def _metadata(match: Match) -> dict[str, str]:
    entry = match.best.id if match.best and match.outcome is Outcome.DIRECT else ""
    return {"faq_outcome": match.outcome.value, "faq_entry": entry,
            "faq_score": f"{match.score:.3f}"}


def _context(instructions: str, match: Match) -> str:
    lines = [instructions]
    for entry, _ in match.ranked:
        lines.append(_format(entry))
    return "\n\n".join(lines)


def _format(entry: Entry) -> str:
    return f"FAQ {entry.id}\nQ: {entry.questions[0]}\nA: {entry.answer}"


def _opinions(scorer: Scorer, question: str) -> tuple[list[float], list[float] | None]:
    """The scorer's scores for ``question`` and its second opinion (one thread hop)."""
    return scorer.scores(question), scorer.second_opinion(question)

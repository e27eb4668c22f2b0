"""Prometheus metrics of one Parley process, on a registry of its own (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector


class Metrics:
    """The counters and histograms the engine and adapters update.

    With ``multiprocess_dir`` (a child of ``parley run --processes N``, whose
    ``PROMETHEUS_MULTIPROC_DIR`` it is), :meth:`render` adds up every process's values
    from that folder (prometheus_client's multiprocess mode) instead of this one's.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 multiprocess_dir: str | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._multiprocess_dir = multiprocess_dir
        self.messages = Counter(
            "parley_messages_total",
            "Messages handled, by outcome "
            "(answered, command, blocked, duplicate, invalid, slow_down, error).",
            ["bot", "channel", "outcome"],
            registry=self.registry,
        )
        self.errors = Counter(
            "parley_errors_total",
            "Failures turned into an apology, by pipeline stage.",
            ["bot", "stage"],
            registry=self.registry,
        )
        self.plugin_failures = Counter(
            "parley_plugin_failures_total",
            "Plugin commands, hooks, providers and tasks that raised or timed out, by plugin.",
            ["bot", "plugin"],
            registry=self.registry,
        )
        self.faq = Counter(
            "parley_faq_answers_total",
            "FAQ plugin outcomes (direct, context, abstain), by the entry that answered.",
            ["bot", "outcome", "entry"],
            registry=self.registry,
        )
        self.moderation = Counter(
            "parley_moderation_actions_total",
            "Moderation decisions other than allow, on input and on output.",
            ["bot", "channel", "direction", "action"],
            registry=self.registry,
        )
        self.moderation_categories = Counter(
            "parley_moderation_findings_total",
            "What moderation found, by category (insult, threat, hate, sexual, selfharm, "
            "spam, pii, injection, leak, ...), on input and on output.",
            ["bot", "channel", "direction", "category"],
            registry=self.registry,
        )
        self.reply_seconds = Histogram(
            "parley_reply_seconds",
            "Time from a message's arrival to the end of its reply.",
            ["bot"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.first_token_seconds = Histogram(
            "parley_first_token_seconds",
            "Time from a message's arrival to the first piece of its reply.",
            ["bot"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        everyone = CollectorRegistry()
        MultiProcessCollector(everyone, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(everyone)


class WorkerMetrics:
    """The counters of one worker process, on a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.jobs = Counter(
            "parley_worker_jobs_total",
            "Jobs that ended here, by outcome "
            "(done, cancelled, expired, failed, handed_back, lost, dead_lettered).",
            ["outcome"],
            registry=self.registry,
        )
        self.reclaimed = Counter(
            "parley_worker_reclaimed_total",
            "Jobs taken over from a worker that went silent.",
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "parley_worker_dead_letters_total",
            "Jobs moved to the dead-letter stream, by reason (malformed, attempts).",
            ["reason"],
            registry=self.registry,
        )
        self.running = Gauge(
            "parley_worker_running_jobs", "Jobs running now.", registry=self.registry
        )

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)

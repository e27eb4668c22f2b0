"""A batch schedule for transformers' batching manager that gives newcomers their first
token without waiting behind a decode step.

The manager's FIFO scheduler puts every running request's next token in a step first and
fills the rest of the token budget with prompts; a request that arrives while 15 others
decode waits for the running step, then shares its own prefill step with 15 decodes. The
manager's ``prefill_first`` scheduler only favours prompts already split across steps.

:class:`NewcomersFirst` runs a step of prompts alone whenever prompts are waiting (new
ones, or the rest of one split by the token budget), and decodes otherwise. The running
requests lose one step per newcomer, a small share while the batch is full (a newcomer
only gets a slot when a request ends), and the newcomer's first token comes one decode
step sooner. When no prompt fits the KV cache, the step decodes as FIFO would.

Private names: ``SCHEDULER_MAPPING``, ``FIFOScheduler`` and its ``active_requests``,
``block_new_requests``, ``_get_waiting_candidates``, ``_process_candidates`` and
``_cleanup_waiting_queue``; ``RequestStatus.PREFILLING``. Switched off, the manager's own
FIFO schedule runs.
"""

from __future__ import annotations

from typing import Any

from transformers.generation.continuous_batching.requests import RequestStatus
from transformers.generation.continuous_batching.scheduler import (
    SCHEDULER_MAPPING,
    FIFOScheduler,
)

from core.generation.local.hf.patch import Patch

NAME = "parley_newcomers_first"


class StepTokens:
    """Tokens the model's forward passes have computed (prompt tokens found in the KV
    cache by prefix sharing are not computed), counted by the schedule as it plans steps."""

    def __init__(self) -> None:
        self.computed = 0


class NewcomersFirst(FIFOScheduler):
    """FIFO, except that waiting prompts get a step of their own (see the module doc)."""

    tokens: StepTokens | None = None  # set by NewcomersFirstSchedule after start

    def schedule_batch(self, token_budget: int, cache_budget: int) -> tuple[Any, bool, int, int]:
        planned = self._plan(token_budget, cache_budget)
        if self.tokens is not None and planned[0]:
            self.tokens.computed += int(planned[2])  # the step's query tokens
        return planned

    def _plan(self, token_budget: int, cache_budget: int) -> tuple[Any, bool, int, int]:
        prompts = [state for state in self.active_requests.values()
                   if state.status == RequestStatus.PREFILLING]
        if not self.block_new_requests:
            prompts.extend(self._get_waiting_candidates())
        if prompts:
            left_waiting: set[str] = set()
            scheduled, _, fast_path, q_tokens, kv_read = self._process_candidates(
                prompts, token_budget, cache_budget, left_waiting
            )
            self._cleanup_waiting_queue(left_waiting)
            if scheduled:
                return scheduled, fast_path, q_tokens, kv_read
        return super().schedule_batch(token_budget, cache_budget)


class NewcomersFirstSchedule(Patch):
    """Registers :class:`NewcomersFirst` and makes the manager schedule with it."""

    name = "scheduler"
    uses = "SCHEDULER_MAPPING, FIFOScheduler._process_candidates and its helpers"

    def __init__(self) -> None:
        self.tokens = StepTokens()  # across every manager this patch is applied to

    def configure(self, generation: dict[str, Any], batching: dict[str, Any]) -> None:
        """Name the schedule in the batching config."""
        SCHEDULER_MAPPING[NAME] = NewcomersFirst
        batching["scheduler_type"] = NAME

    def after_start(self, manager: Any) -> None:
        """Check that the manager really runs this schedule."""
        scheduler = manager.batch_processor.scheduler
        if not isinstance(scheduler, NewcomersFirst):
            raise TypeError(f"the manager schedules with {type(scheduler).__name__}")
        scheduler.tokens = self.tokens

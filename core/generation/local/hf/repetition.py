"""Per-request repetition control inside transformers' continuous batching.

:class:`BatchRepetition` applies :func:`~core.generation.local.repetition.penalize` to
each row with the request's own ``repetition_penalty`` and ``no_repeat_ngram_size``,
over the tokens that request has generated. Each step's argument row holds a ticket
number per request; the tokens and settings wait under that number until the step's
logits arrive, so a step prepared while another runs cannot mix them up.

Private names: ``ContinuousBatchingLogitsProcessor`` (``prepare_tensor_args``,
``fill_defaults``), a request state's ``logit_processor_kwargs`` and ``generated_tokens``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)

from core.generation.local.repetition import penalize

_TICKETS = 2**31 - 1
_MAX_WAITING = 4096  # tickets of steps that never reached the logits (a failed step)


class BatchRepetition(ContinuousBatchingLogitsProcessor):
    """Repetition penalty and no-repeat n-gram per request (defaults: both off)."""

    supported_kwargs: dict[str, type] = {"repetition_penalty": float,
                                         "no_repeat_ngram_size": int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        self._waiting: dict[int, tuple[list[int], float, int]] = {}

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        """Rows without a request: ticket 0, nothing to do."""
        int32_tensor.zero_()

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        """A ticket per request that has something to penalize, 0 for the others."""
        tickets = []
        for request in requests_with_new_token:
            kwargs = request.state.logit_processor_kwargs
            penalty = float(kwargs.get("repetition_penalty", 1.0))
            ngram = int(kwargs.get("no_repeat_ngram_size", 0))
            generated = request.state.generated_tokens
            if (penalty == 1.0 and ngram <= 0) or not generated:
                tickets.append(0)
                continue
            ticket = next(self._numbers) % _TICKETS or next(self._numbers)
            if len(self._waiting) >= _MAX_WAITING:
                del self._waiting[next(iter(self._waiting))]  # the oldest
            self._waiting[ticket] = (list(generated), penalty, ngram)
            tickets.append(ticket)
        return torch.tensor(tickets, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        """Each row's scores with its request's repetition made unlikely (or impossible)."""
        tickets = tensor_arg[: scores.size(0)].tolist()
        for row, ticket in enumerate(tickets):
            waiting = self._waiting.pop(ticket, None) if ticket else None
            if waiting is not None:
                penalize(scores[row], *waiting)
        return scores

"""Repetition control on a reply's own tokens: a penalty and a no-repeat n-gram ban.

Small chat models loop ("a creative and creative person." seven times); a repetition
penalty makes tokens the reply already used less likely, and the n-gram ban forbids the
token that would repeat an n-gram the reply already contains. Both look only at the
tokens generated so far, never at the prompt: a reply must stay free to repeat what the
user said (their name, an order number). transformers' own processors look at the whole
sequence, prompt included, which is why these exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def banned_tokens(generated: Sequence[int], n: int) -> set[int]:
    """The tokens that, generated next, would repeat an ``n``-gram of ``generated``."""
    if n <= 0 or len(generated) < n - 1 or not generated:
        return set()
    if n == 1:
        return set(generated)
    prefix = list(generated[len(generated) - (n - 1):])
    return {generated[i + n - 1] for i in range(len(generated) - n + 1)
            if list(generated[i:i + n - 1]) == prefix}


def penalize(row: torch.Tensor, generated: Sequence[int], penalty: float, ngram: int) -> None:
    """Apply the penalty and the n-gram ban for ``generated`` to one row of logits, in place.

    The penalty divides a positive logit and multiplies a negative one (as in CTRL and
    transformers), once per distinct token the reply has used.
    """
    import torch

    if not generated:
        return
    if penalty != 1.0:
        ids = torch.tensor(sorted(set(generated)), dtype=torch.long, device=row.device)
        scores = row.index_select(0, ids)
        row.index_copy_(0, ids, torch.where(scores > 0, scores / penalty, scores * penalty))
    banned = banned_tokens(generated, ngram)
    if banned:
        ids = torch.tensor(sorted(banned), dtype=torch.long, device=row.device)
        row.index_fill_(0, ids, float("-inf"))


class ReplyRepetition:
    """A logits processor for ``model.generate``: :func:`penalize` on the tokens after the
    prompt (the first ``prompt_length`` of each row are the prompt)."""

    def __init__(self, prompt_length: int, penalty: float, ngram: int) -> None:
        self.prompt_length = prompt_length
        self.penalty = penalty
        self.ngram = ngram

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The scores with the reply's repetition made unlikely (or impossible)."""
        for row in range(scores.size(0)):
            generated = input_ids[row, self.prompt_length:].tolist()
            penalize(scores[row], generated, self.penalty, self.ngram)
        return scores

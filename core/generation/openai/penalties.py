"""Repetition penalties across the OpenAI API, which has no multiplicative one.

The local backend divides the logit of every token already in the reply by
``repetition_penalty`` (once per token, however often it occurred). OpenAI's
``presence_penalty`` has the same once-per-token shape but subtracts from the logit
(``frequency_penalty`` subtracts per occurrence). No mapping is exact; this one is 0 at 1
and reaches OpenAI's maximum, 2, at a penalty of 2: 1.1 -> 0.275, 1.15 -> 0.403,
1.5 -> 1.17. ``parley worker``'s API reads a presence penalty back with the inverse.
"""

from __future__ import annotations

import math

PRESENCE_PER_DOUBLING = 2.0
MAX_PRESENCE = 2.0


def presence_for_penalty(repetition_penalty: float) -> float:
    """OpenAI's ``presence_penalty`` for a multiplicative ``repetition_penalty`` (>= 1)."""
    return round(min(MAX_PRESENCE, PRESENCE_PER_DOUBLING * math.log2(repetition_penalty)), 3)


def penalty_for_presence(presence_penalty: float) -> float:
    """The multiplicative penalty a ``presence_penalty`` (>= 0) stands for."""
    return round(float(2.0 ** (presence_penalty / PRESENCE_PER_DOUBLING)), 4)

"""Spam and flood within one message: a character or a word repeated over and over.

Promotional spam (links, "free nitro", "earn $5000 a week") is the classifier's job;
what is left here is what needs no model: a run of one character (``aaaaaaaa…``, an emoji
pasted thirty times) or a message that is mostly one word or phrase repeated. Flooding
across messages is the ``flood`` filter (rate limits).
"""

from __future__ import annotations

import re
from collections import Counter

RUN = 20  # one character this many times in a row
_RUN = re.compile(rf"(.)\1{{{RUN - 1},}}", re.DOTALL)
_MIN_WORDS = 6
_FEW = 4


def check_spam(text: str) -> str | None:
    """Why ``text`` is spam (``run`` or ``repeat``), or None."""
    if len(text) >= RUN and _RUN.search(text):
        return "run"
    words = text.casefold().split()
    if len(words) >= _MIN_WORDS:
        top = Counter(words).most_common(1)[0][1]
        # A few words over and over ("lol lol lol ..."), or one word half the message.
        if len(set(words)) <= _FEW or top * 2 >= len(words):
            return "repeat"
    return None

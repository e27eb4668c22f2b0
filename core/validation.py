"""What every channel refuses before a message reaches the pipeline."""

from __future__ import annotations

import re

from core.errors import InvalidMessage

# C0 and C1 controls except tab, newline and carriage return; and lone surrogates, which
# is what invalid UTF-8 becomes when decoded with ``surrogateescape``.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str, max_chars: int) -> str:
    """``text`` stripped of surrounding space, or ``InvalidMessage`` saying why not.

    Refuses empty text, text over ``max_chars`` characters, control characters and
    invalid UTF-8 (lone surrogates).
    """
    if len(text) > max_chars:
        raise InvalidMessage(f"message is too long ({len(text)} characters, at most {max_chars})")
    # Printable text has neither (str.isprintable: one pass in C, a quarter of the two
    # searches' cost, and nearly every message is printable).
    if not text.isprintable():
        if _SURROGATE.search(text):
            raise InvalidMessage("message is not valid UTF-8 text")
        bad = _CONTROL.search(text)
        if bad:
            raise InvalidMessage(
                f"message contains a control character (U+{ord(bad.group()):04X})")
    stripped = text.strip()
    if not stripped:
        raise InvalidMessage("message is empty")
    return stripped

"""What every channel adapter shares: the Adapter protocol and helpers for platform limits."""

from __future__ import annotations

from core.app import Adapter, AdapterFactory

__all__ = ["Adapter", "AdapterFactory", "split_message"]

# Preferred cut points, best first: between paragraphs, between lines, between words.
_SEPARATORS = ("\n\n", "\n", " ")


def split_message(text: str, limit: int) -> list[str]:
    """``text`` cut into parts of at most ``limit`` characters, for platforms that cap a message.

    Cuts between paragraphs if it can, else between lines, else between words, else (a word
    longer than ``limit``) inside the word. Only whitespace at a cut is dropped, so the
    parts, in order, hold every other character of ``text``; whitespace-only parts are left
    out, and text with nothing but whitespace gives no parts. ``limit`` counts code points
    (a platform that counts UTF-16 units, like Telegram, should pass a safe margin).
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1 (got {limit})")
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        # A separator starting right at ``limit`` still lets the part be ``limit`` long.
        window = rest[: limit + 1]
        for separator in _SEPARATORS:
            cut = window.rfind(separator)
            if cut > 0:
                part, rest = rest[:cut], rest[cut + len(separator) :]
                # Spaces after a line break may be indentation; after a word, just space.
                rest = rest.lstrip(" " if separator == " " else "\n")
                break
        else:
            part, rest = rest[:limit], rest[limit:]
        part = part.rstrip()
        if part:
            parts.append(part)
    if rest.strip():
        parts.append(rest)
    return parts

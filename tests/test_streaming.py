"""bots.base.split_message (platform limits) and bots.streaming (replies grown by edits).

The surface here is an in-memory chat that records each call with its time: the far end
of the wire, as a platform would be; StreamingReply itself is the real one.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from bots.base import split_message, utf16_length
from bots.streaming import RESET_PLACEHOLDER, StreamingReply, StreamLimits
from core.types import ReplyEvent, ReplyKind

# -- split_message ----------------------------------------------------------------------

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # one grapheme, 5 code points, 8 units
FLAG = "\U0001f1fa\U0001f1e6"
ACCENTED = "e\u0301"


def graphemes(text: str) -> list[str]:
    return regex.findall(r"\X", text, flags=regex.DOTALL)


def test_utf16_length_counts_astral_characters_twice() -> None:
    assert utf16_length("abc") == 3
    assert utf16_length(FAMILY) == 8
    assert utf16_length("é" + FLAG) == 5


def test_split_counts_utf16_units_when_told() -> None:
    text = "\U0001f600" * 10  # 10 code points, 20 UTF-16 units
    assert split_message(text, 10) == [text]
    parts = split_message(text, 10, length=utf16_length)
    assert parts == ["\U0001f600" * 5, "\U0001f600" * 5]


def test_split_never_breaks_a_grapheme_cluster() -> None:
    text = (FAMILY + FLAG + ACCENTED) * 20
    for limit in (8, 9, 10, 13, 17, 50):
        parts = split_message(text, limit, length=utf16_length)
        assert "".join(parts) == text
        assert all(utf16_length(part) <= limit for part in parts)
        # Every cut lies on a cluster boundary of the whole text.
        cuts, at = set(), 0
        for part in parts[:-1]:
            at += len(part)
            cuts.add(at)
        boundaries, at = set(), 0
        for cluster in graphemes(text):
            at += len(cluster)
            boundaries.add(at)
        assert cuts <= boundaries


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(["a", "word ", " ", "\n", "\n\n", FAMILY, FLAG, ACCENTED, "\U0001f600",
                         "`x y`", "**bold text**", "```py\nprint(1)\n```\n"]),
        max_size=80,
    ),
    st.integers(min_value=12, max_value=60),
)
def test_split_property_fits_and_keeps_every_cluster(pieces: list[str], limit: int) -> None:
    text = "".join(pieces)
    parts = split_message(text, limit, length=utf16_length)
    for part in parts:
        assert 0 < utf16_length(part) <= limit and part.strip()
    # Without Markdown nothing is added: the parts are the text less whitespace at cuts.
    squeezed = "".join(text.split())
    assert "".join("".join(p.split()) for p in parts) == squeezed


def test_split_reopens_a_code_block_with_its_language() -> None:
    code = "\n".join(f"line_{i} = {i}" for i in range(40))
    text = f"Here you go:\n\n```python\n{code}\n```\n\nDone."
    parts = split_message(text, 200, markdown=True)
    assert len(parts) > 2
    for part in parts:
        assert len(part) <= 200
        assert part.count("```") % 2 == 0, part  # every part's blocks are closed
    assert parts[0].startswith("Here you go:")
    for part in parts[1:-1]:
        assert part.startswith("```python\n")
    # The code survives: each line appears once, in order.
    lines = [ln for p in parts for ln in p.splitlines() if ln.startswith("line_")]
    assert lines == code.splitlines()
    assert parts[-1].endswith("Done.")


def test_split_does_not_cut_inline_formatting() -> None:
    text = "intro " + " ".join(f"**bold {i} words**" for i in range(30))
    for part in split_message(text, 50, markdown=True):
        assert part.count("**") % 2 == 0, part
    link = "see [the manual page](https://example.org/manual) now " * 10
    for part in split_message(link, 60, markdown=True):
        assert part.count("[") == part.count("]("), part


def test_split_is_prefix_stable() -> None:
    text = " ".join(f"word{i}" for i in range(400))
    full = split_message(text, 100, length=utf16_length, markdown=True)
    for end in range(250, len(text), 97):
        grown = split_message(text[:end], 100, length=utf16_length, markdown=True)
        assert grown[:-1] == full[: len(grown) - 1]


# -- StreamingReply ---------------------------------------------------------------------


class Chat:
    """An in-memory chat: messages by id, and every call with its time."""

    def __init__(self) -> None:
        self.messages: dict[int, str] = {}
        self.calls: list[tuple[float, str, int | None, str]] = []
        self._next = 1

    async def send(self, text: str) -> int:
        await asyncio.sleep(0)
        handle, self._next = self._next, self._next + 1
        self.messages[handle] = text
        self.calls.append((time.monotonic(), "send", handle, text))
        return handle

    async def edit(self, handle: int, text: str) -> None:
        await asyncio.sleep(0)
        assert self.messages[handle] != text, "an edit that changes nothing"
        self.messages[handle] = text
        self.calls.append((time.monotonic(), "edit", handle, text))

    async def delete(self, handle: int) -> None:
        del self.messages[handle]
        self.calls.append((time.monotonic(), "delete", handle, ""))

    async def typing(self) -> None:
        self.calls.append((time.monotonic(), "typing", None, ""))

    def visible(self) -> list[str]:
        return [self.messages[k] for k in sorted(self.messages)]

    def kinds(self) -> list[str]:
        return [c[1] for c in self.calls]


async def events(*items: ReplyEvent | float) -> AsyncIterator[ReplyEvent]:
    for item in items:
        if isinstance(item, float):
            await asyncio.sleep(item)
        else:
            yield item


def delta(text: str) -> ReplyEvent:
    return ReplyEvent(ReplyKind.DELTA, text)


def final(text: str) -> ReplyEvent:
    return ReplyEvent(ReplyKind.FINAL, text)


TYPING = ReplyEvent(ReplyKind.TYPING)
LIMITS = StreamLimits(max_length=4096, length=utf16_length, edit_interval=0.1,
                      typing_interval=0.05)


async def test_a_streamed_reply_grows_by_paced_edits() -> None:
    chat = Chat()
    words = [f"w{i} " for i in range(40)]
    stream = [TYPING, 0.12]
    for word in words:
        stream += [delta(word), 0.01]
    stream.append(final("".join(words).strip()))
    reply = StreamingReply(chat, LIMITS)
    assert await reply.render(events(*stream)) == "".join(words).strip()
    assert chat.visible() == ["".join(words).strip()]
    kinds = chat.kinds()
    assert kinds.count("typing") >= 2  # repeated while waiting for the first words
    assert kinds.count("send") == 1
    assert "typing" not in kinds[kinds.index("send") :]
    updates = [t for t, kind, _, _ in chat.calls if kind in ("send", "edit")]
    assert 3 <= len(updates) < len(words)  # coalesced, not one edit per word
    gaps = [b - a for a, b in itertools.pairwise(updates)]
    assert min(gaps) >= LIMITS.edit_interval * 0.95


async def test_without_streaming_one_message_at_the_end() -> None:
    chat = Chat()
    reply = StreamingReply(chat, LIMITS, streaming=False)
    await reply.render(events(TYPING, delta("Hello"), 0.05, delta(" there"), final("Hello there")))
    assert [k for k in chat.kinds() if k != "typing"] == ["send"]
    assert chat.visible() == ["Hello there"]


async def test_reset_replaces_what_was_shown() -> None:
    chat = Chat()
    reply = StreamingReply(chat, LIMITS)
    await reply.render(events(
        delta("the first try"), 0.15, ReplyEvent(ReplyKind.RESET), 0.15,
        delta("second"), final("second answer"),
    ))
    assert chat.visible() == ["second answer"]
    assert next(c[3] for c in chat.calls if c[1] == "edit") == RESET_PLACEHOLDER


async def test_a_long_reply_continues_in_new_messages() -> None:
    chat = Chat()
    limits = StreamLimits(max_length=100, length=utf16_length, edit_interval=0.0)
    text = " ".join(f"word{i}" for i in range(100))
    stream: list[ReplyEvent | float] = [delta(w + " ") for w in text.split()]
    reply = StreamingReply(chat, limits)
    await reply.render(events(*stream, final(text)))
    assert chat.visible() == split_message(text, 100, length=utf16_length, markdown=True)
    assert all(utf16_length(m) <= 100 for m in chat.visible())


async def test_a_shorter_final_deletes_extra_messages() -> None:
    chat = Chat()
    limits = StreamLimits(max_length=20, edit_interval=0.0)
    reply = StreamingReply(chat, limits)
    await reply.render(events(delta("a " * 30), 0.05, final("withheld")))
    assert chat.visible() == ["withheld"]
    assert "delete" in chat.kinds()


async def test_a_failed_delivery_is_finished_without_duplicates() -> None:
    chat = Chat()
    limits = StreamLimits(max_length=20, edit_interval=0.0)
    reply = StreamingReply(chat, limits, streaming=False)
    text = "one two three four five six seven eight nine ten eleven"
    original_send = chat.send
    sent = 0

    async def flaky_send(text: str) -> int:
        nonlocal sent
        sent += 1
        if sent == 2:
            raise ConnectionError("platform down")
        return await original_send(text)

    chat.send = flaky_send  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await reply.render(events(final(text)))
    assert len(reply.shown) == 1
    await reply.finish(text)
    assert chat.visible() == split_message(text, 20, markdown=True)


async def test_an_empty_notice_shows_nothing() -> None:
    chat = Chat()
    reply = StreamingReply(chat, LIMITS)
    assert await reply.render(events(ReplyEvent(ReplyKind.NOTICE, code="duplicate"))) is None
    assert chat.calls == []

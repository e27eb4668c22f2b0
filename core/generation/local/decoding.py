"""Token ids to text, one token at a time: incremental detokenization and stop strings.

Both are pure and model-agnostic, shared by every worker that streams from a tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from core.generation.base import FinishReason, TokenDelta
from core.generation.reply_shape import SentenceEnds

if TYPE_CHECKING:
    from core.generation.local.ticket import Ticket

# Decoding restarts this many tokens back, so that tokenizers which decode a token
# differently at the start of a sequence (SentencePiece's leading space) stay correct.
_CONTEXT_TOKENS = 5


class IncrementalDecoder:
    """Turns a growing list of token ids into the text each new token adds.

    Text that ends in U+FFFD (a multi-byte character split across tokens) is held back
    until the following tokens complete it.
    """

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(context[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now certain (possibly empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The text still held back, however incomplete; call once at the end."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if after.startswith(before) else ""


class StopMatcher:
    """Finds stop strings in streamed text without ever emitting any part of one.

    Text that could be the start of a stop string is held back until it is clear either
    way.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add streamed text; return what can be shown. Sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        pending = self._pending + text
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return pending[:cut]
        keep = self._partial_suffix(pending)
        self._pending = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """The held-back text, once the stream has ended without a match."""
        text, self._pending = ("" if self.stopped else self._pending), ""
        return text

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-size:]):
                    best = size
                    break
        return best


class TokenSink:
    """Turns a job's new token ids into deltas: detokenizes, finds stops, counts.

    :meth:`push` returns True once the job is finished (end token, stop string, length,
    or cancellation); by then the final delta has been emitted, unless cancelled.
    """

    def __init__(
        self,
        job: Ticket,
        tokenizer: Any,
        prompt_ids: list[int],
        end_ids: tuple[int, ...],
        stops: tuple[str, ...],
        max_new_tokens: int,
        *,
        wrap_up_at: int | None = None,
        max_sentences: int | None = None,
    ) -> None:
        self.job = job
        self.prompt_ids = prompt_ids
        self.count = 0
        self.finish_reason: FinishReason | None = None
        self._decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self._stops = StopMatcher(stops)
        self._end_ids = frozenset(end_ids)
        self.max_new_tokens = max_new_tokens
        # From the wrap_up_at-th token on, the reply ends at its next sentence end.
        self.wrap_up_at = wrap_up_at
        self._ends = (SentenceEnds(max_sentences)
                      if wrap_up_at is not None or max_sentences is not None else None)
        self._shown = False
        self._space = ""

    @property
    def done(self) -> bool:
        """Whether no more tokens are wanted."""
        return self.finish_reason is not None or self.job.cancelled

    def push(self, token_id: int) -> bool:
        """Take the next generated token; True when generation should stop."""
        if self.done:
            return True
        self.count += 1
        if token_id in self._end_ids:
            self.finish("stop")
            return True
        self._show(self._ended(self._stops.push(self._decoder.push(token_id))))
        if self._stops.stopped or (self._ends is not None and self._ends.stopped):
            self.finish("stop")
        elif self.count >= self.max_new_tokens:
            self.finish("length")
        return self.done

    def finish(self, reason: FinishReason) -> None:
        """Emit what was held back and the final delta, once."""
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        rest = self._stops.push(self._decoder.flush())
        rest = self._ended(rest + self._stops.flush())
        if self.job.cancelled:
            return
        rest = rest.strip() if not self._shown else rest.rstrip()
        self.job.emit(TokenDelta(self._space + rest if rest else "", finish_reason=reason))

    def _ended(self, text: str) -> str:
        if self._ends is None:
            return text
        wrapping_up = self.wrap_up_at is not None and self.count >= self.wrap_up_at
        return self._ends.push(text, wrapping_up=wrapping_up)

    def _show(self, text: str) -> None:
        # A reply neither starts nor ends with whitespace (base models put a space after
        # "Assistant:" and a newline before the next speaker), so whitespace is held back
        # until something follows it.
        if not self._shown:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            self._space += text
            return
        self.job.emit(TokenDelta(self._space + body))
        self._space = text[len(body) :]
        self._shown = True

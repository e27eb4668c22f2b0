"""Helpers for the async streams that run through the pipeline."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Generic, TypeVar

from core.generation.base import TokenDelta

T = TypeVar("T")


class _Closing(Generic[T]):
    """The context manager :func:`closing` returns: a plain class, not an
    ``@asynccontextmanager`` generator (which costs an async generator of its own,
    and several are entered for every message)."""

    __slots__ = ("_stream",)

    def __init__(self, stream: AsyncIterator[T]) -> None:
        self._stream = stream

    async def __aenter__(self) -> AsyncIterator[T]:
        return self._stream

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


def closing(stream: AsyncIterator[T]) -> _Closing[T]:
    """Like ``contextlib.aclosing`` for any async iterator: closes it if it can be closed.

    Closing matters: it is how a consumer that stops early cancels the work behind a
    stream (a generation in the worker, a reply in the engine).
    """
    return _Closing(stream)


async def guarded_attempts(
    deltas: AsyncIterator[TokenDelta],
    guard: Callable[[AsyncIterator[str]], AsyncIterator[str]],
) -> AsyncIterator[TokenDelta]:
    """``deltas`` through an async output guard (``guard(texts) -> pieces``, as
    ``Moderator.guard`` with its message bound): what it releases, as deltas.

    Each attempt of the generator (a remote job reclaimed after its worker died starts
    a new one, its first delta marked ``restart``) runs through a fresh guard, so nothing
    held back from an abandoned attempt leaks into the next; the restart passes on at
    once, as an empty delta. The engine feeds a synchronous guard itself; this serves a
    guard that must await a filter (an external classifier).
    """
    async with closing(deltas):
        iterator = aiter(deltas)
        carry = ""
        while True:
            restarted = False

            async def attempt() -> AsyncIterator[str]:
                nonlocal carry, restarted
                if carry:
                    yield carry
                carry = ""
                async for delta in iterator:
                    if delta.restart:
                        carry, restarted = delta.text, True
                        return
                    if delta.text:
                        yield delta.text

            async with closing(guard(attempt())) as pieces:
                async for piece in pieces:
                    if restarted:
                        break  # what the guard released of the abandoned attempt at its end
                    yield TokenDelta(piece)
            if not restarted:
                return
            yield TokenDelta("", restart=True)

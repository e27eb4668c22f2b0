"""Helpers for the async streams that run through the pipeline."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Generic, TypeVar

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

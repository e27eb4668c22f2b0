"""The terminal channel: try a bot locally, or script it one message per line.

Interactive when stdin is a terminal (a prompt, the reply streamed as it is made);
otherwise each input line is one message and each reply is one output line — with
``json = true``, one JSON object per line with ``text``, ``action``, ``kind`` and ``code``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
import uuid
from collections.abc import AsyncGenerator, Mapping
from typing import IO, Any, Literal

from bots.base import adapter_settings
from core.config import BotSettings, Section
from core.engine import Engine
from core.streams import closing
from core.types import IncomingMessage, ReplyEvent, ReplyKind


class ConsoleSettings(Section):
    """``[adapters.console]``."""

    output: Literal["text", "json"] = "text"  # json: one object per reply, when piped
    user_id: str = "local"
    conversation_id: str = "terminal"
    interactive: bool | None = None  # default: whether stdin is a terminal
    exit_on_eof: bool | None = None  # default: when interactive
    prompt: str = "you> "


class ConsoleAdapter:
    """Reads messages from stdin and writes replies to stdout."""

    channel = "console"

    def __init__(
        self,
        settings: BotSettings,
        section: Mapping[str, Any],
        *,
        stdin: IO[bytes] | None = None,
        stdout: IO[str] | None = None,
    ) -> None:
        self.settings = settings
        self.config = adapter_settings(ConsoleSettings, settings, section, "console")
        self._stdin = stdin
        self._stdout = stdout
        self._task: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()

    async def start(self, engine: Engine) -> None:
        """Begin reading input in the background."""
        if self._task is None:
            self._finished.clear()
            self._task = asyncio.create_task(self._run(engine), name="console-adapter")

    async def stop(self) -> None:
        """Stop reading; a reply in progress is cancelled."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait(self) -> None:
        """Return at the end of input if ``exit_on_eof``; otherwise only when stopped.

        Raises what crashed the adapter (its output closed, say), so ``serve`` stops.
        """
        task = self._task
        finished = asyncio.ensure_future(self._finished.wait())
        try:
            await asyncio.wait([finished] + ([task] if task else []),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished.cancel()
        if task is not None and task.done() and not task.cancelled():
            error = task.exception()
            if error is not None:
                raise error
            if not self._finished.is_set():
                await self._finished.wait()  # ended without exit_on_eof: wait for stop

    async def _run(self, engine: Engine) -> None:
        stdin = self._stdin or sys.stdin.buffer
        out = self._stdout or sys.stdout
        interactive = self.config.interactive
        if interactive is None:
            interactive = stdin.isatty()
        exit_on_eof = self.config.exit_on_eof
        if exit_on_eof is None:
            exit_on_eof = interactive
        if interactive:
            out.write(f"{engine.name} is listening. /help for commands, Ctrl-D to quit.\n")
        lines = read_lines(stdin)
        try:
            while True:
                if interactive:
                    out.write(self.config.prompt)
                    out.flush()
                raw = await anext(lines, None)
                if raw is None:
                    break
                # Invalid UTF-8 survives as lone surrogates, which the engine refuses
                # with a clear message instead of this loop crashing.
                text = raw.decode("utf-8", errors="surrogateescape").rstrip("\r\n")
                if not text.strip() and interactive:
                    continue
                message = IncomingMessage(
                    bot=engine.name,
                    channel=self.channel,
                    conversation_id=self.config.conversation_id,
                    user_id=self.config.user_id,
                    message_id=uuid.uuid4().hex,
                    text=text,
                )
                async with closing(engine.handle(message)) as events:
                    if interactive:
                        await _render_streaming(events, out)
                    else:
                        await _render_line(events, out, as_json=self.config.output == "json")
        finally:
            await lines.aclose()
            if interactive:
                out.write("\n")
                out.flush()
        if exit_on_eof:
            self._finished.set()


async def _render_streaming(events: Any, out: IO[str]) -> None:
    shown = False
    async for event in events:
        if event.kind is ReplyKind.DELTA:
            if not shown:
                out.write("bot> ")
                shown = True
            out.write(event.text)
            out.flush()
        elif event.kind is ReplyKind.RESET and shown:
            out.write(" [starting over]\nbot> ")
            out.flush()
        elif event.is_last:
            if shown:
                out.write("\n")
            elif event.text:
                out.write(f"bot> {event.text}\n")
            out.flush()


async def _render_line(events: Any, out: IO[str], *, as_json: bool) -> None:
    last: ReplyEvent | None = None
    async for event in events:
        if event.is_last:
            last = event
    if last is None:
        return
    if as_json:
        record = {"text": last.text, "action": last.action, "kind": last.kind.value,
                  "code": last.code}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        out.write(last.text.replace("\n", " ") + "\n")
    out.flush()


async def read_lines(stdin: IO[bytes]) -> AsyncGenerator[bytes, None]:
    """The lines of ``stdin`` (each with its newline, the last maybe without), on the loop.

    A terminal or pipe is watched by the event loop (``add_reader``) and read only when
    it has data, so no thread is ever blocked in a read: a thread blocked on the
    terminal at exit makes the interpreter abort (``_enter_buffered_busy``) and keeps a
    Ctrl-C from ending the program cleanly. Regular files (which the loop cannot
    watch) and in-memory streams never block, so they are read directly.
    """
    try:
        fd = stdin.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        for line in iter(stdin.readline, b""):
            yield line
        return
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
        chunks.put_nowait(data)

    try:
        loop.add_reader(fd, readable)
    except (PermissionError, ValueError, OSError):  # a regular file: epoll refuses it
        watched = False
    else:
        watched = True
    try:
        pending = b""
        while True:
            data = await chunks.get() if watched else os.read(fd, 65536)
            if not data:
                break
            pending += data
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line + b"\n"
        if pending:
            yield pending
    finally:
        if watched:
            loop.remove_reader(fd)

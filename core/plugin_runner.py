"""How the engine runs plugin code: commands, pre-hooks, context providers, post-hooks.

Every call runs under ``[plugins] timeout`` with its plugin's name attached; a failure
is logged and counted (``parley_plugin_failures_total``) and raised as
:class:`PluginFailed`, which the engine turns into a short apology. Post-hooks run in
the background and only log and count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from core.errors import ParleyError
from core.memory.base import MemoryStore
from core.plugins import (
    SILENT,
    AddContext,
    CommandContext,
    CommandError,
    Exchange,
    PluginRegistry,
    Reply,
    Silence,
)
from core.types import IncomingMessage, Turn

log = logging.getLogger(__name__)

T = TypeVar("T")

UNKNOWN_COMMAND = "unknown command, try /help"
ADMINS_ONLY = "Sorry, /{name} is for this channel's admins."


class PluginFailed(ParleyError):
    """A plugin's command, pre-hook or context provider raised or ran out of time."""

    def __init__(self, plugin: str, what: str) -> None:
        super().__init__(f"plugin {plugin}: {what} failed")
        self.plugin = plugin


@dataclass(frozen=True, slots=True)
class Before:
    """What the plugins made of a message before the model: a reply (``kind`` says how
    it ends the stream), silence, or context for the prompt."""

    reply: Reply | None = None
    kind: str = "final"  # "final" (a pre-hook's answer) or "notice" (a command's)
    code: str | None = None
    silent: bool = False
    contexts: list[AddContext] = field(default_factory=list)
    plugin: str = ""  # the command's plugin, for its deferred work
    deferred: Sequence[Callable[[], Awaitable[object]]] = ()


class PluginRunner:
    """Runs one bot's plugins for the engine."""

    def __init__(self, registry: PluginRegistry, memory: MemoryStore, *, timeout: float) -> None:
        self.registry = registry
        self.memory = memory
        self.timeout = timeout

    async def call(self, plugin: str, what: str, call: Awaitable[T]) -> T:
        """``call`` under the timeout; a failure is reported and raised as PluginFailed."""
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except (CommandError, asyncio.CancelledError):
            raise
        except Exception as exc:
            self.registry.failed(plugin, what, exc)
            raise PluginFailed(plugin, what) from exc

    async def before(self, message: IncomingMessage) -> Before:
        """Commands first (known, admin-only, unknown), then the pre-hooks in order."""
        registry = self.registry
        matched = registry.match_command(message.text)
        if matched is not None:
            command, args = matched
            admin = registry.is_admin(message.channel, message.user_id)
            if command.admin and not admin:
                return Before(Reply(ADMINS_ONLY.format(name=command.name)), "notice",
                              "not_admin")
            ctx = CommandContext(message, args, self.memory, registry,
                                 registry.split_args(args), admin)
            try:
                text = await self.call(command.plugin, f"command /{command.name}",
                                       command.handler(ctx))
            except CommandError as exc:
                text = str(exc)
            return Before(Reply(text), "notice", "command", plugin=command.plugin,
                          deferred=tuple(ctx.deferred))
        if registry.looks_like_command(message.text):
            return Before(Reply(UNKNOWN_COMMAND), "notice", "unknown_command")
        paused = registry.checks_pauses and await registry.services.pauses.paused(message.key)
        contexts: list[AddContext] = []
        for hook in registry.pre_hooks:
            if paused and not hook.when_paused:
                continue
            result = await self.call(hook.plugin, "pre-hook", hook.fn(message))
            if isinstance(result, str):
                result = Reply(result)
            if isinstance(result, Reply):
                return Before(result)
            if isinstance(result, Silence):
                return Before(silent=True)
            if isinstance(result, AddContext):
                contexts.append(result)
        if paused:
            return Before(silent=True, code="paused")
        return Before(contexts=contexts)

    async def contexts(self, message: IncomingMessage,
                       found: Sequence[AddContext]) -> list[AddContext]:
        """The pre-hooks' contexts then the providers', within the token budget."""
        budget = self.registry.context_tokens
        kept: list[AddContext] = []
        candidates: list[tuple[AddContext, int | None]] = [(c, None) for c in found]
        for provider in self.registry.context_providers:
            result = await self.call(provider.plugin, "context provider", provider.fn(message))
            if isinstance(result, str):
                result = AddContext(result) if result else None
            if result is not None and result.text:
                candidates.append((result, provider.max_tokens))
        for context, cap in candidates:
            allowed = budget if cap is None else min(cap, budget)
            wanted = estimate_tokens(context.text)
            # A sliver of a long text is noise: below 16 tokens, a text fits whole or not.
            text = "" if allowed < min(wanted, 16) else fit_tokens(context.text, allowed)
            if not text:
                log.info("bot %s: plugin context dropped: over the budget of %d tokens",
                         self.registry.services.bot, self.registry.context_tokens)
                continue
            budget -= estimate_tokens(text)
            kept.append(replace(context, text=text))
        return kept

    async def finally_(self, before: Before) -> None:
        """Run what a command deferred until its answer was recorded."""
        for fn in before.deferred:
            await self.call(before.plugin, "deferred work", fn())

    def after(self, message: IncomingMessage, reply: str,
              history: Sequence[Turn] = ()) -> None:
        """Start each post-hook on the stored exchange, in the background."""
        hooks = self.registry.post_hooks
        if not hooks:
            return
        exchange = Exchange(message, reply, tuple(history))
        for hook in hooks:
            self.registry.plugin(hook.plugin).spawn(hook.fn(exchange), "post-hook")


def estimate_tokens(text: str) -> int:
    """Tokens ``text`` takes, roughly (4 characters a token): the worker owns the real
    tokenizer, and a budget only needs to be about right."""
    return (len(text) + 3) // 4


def fit_tokens(text: str, tokens: int) -> str:
    """``text`` cut at a word boundary to about ``tokens`` tokens ("" if none fit)."""
    if tokens <= 0:
        return ""
    limit = tokens * 4
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip()
    return f"{cut} …" if cut else ""


__all__ = ["SILENT", "Before", "PluginFailed", "PluginRunner"]

"""A plugin with a bug in each of its parts, to check that plugins are contained.

Loaded by name (``[plugins] modules = ["tests.support.broken_plugin"]``), so failures
are reported under the plugin's name, ``broken_plugin``. Each part fails only on its trigger word.
"""

from __future__ import annotations

import asyncio

from core.plugins import CommandContext, PluginRegistry
from core.types import IncomingMessage


async def _boom(ctx: CommandContext) -> str:
    raise RuntimeError("the command fell over")


async def _hook(message: IncomingMessage) -> str | None:
    if "hook-crash" in message.text:
        raise KeyError("hook")
    if "hook-hang" in message.text:
        await asyncio.sleep(3600)
    return None


async def _context(message: IncomingMessage) -> str | None:
    if "context-crash" in message.text:
        raise ValueError("context")
    return None


def setup(registry: PluginRegistry) -> None:
    """Register the broken command, pre-hook and context provider."""
    registry.add_command("boom", _boom, "fails")
    registry.add_pre_hook(_hook)
    registry.add_context_provider(_context)

"""The commands every bot has: ``/help`` and ``/reset``."""

from __future__ import annotations

from core.plugins import CommandContext, PluginRegistry


async def help_command(ctx: CommandContext) -> str:
    """List the commands this bot understands."""
    lines = ["Commands:"]
    lines += [f"/{cmd.name} - {cmd.help}" if cmd.help else f"/{cmd.name}"
              for cmd in ctx.registry.commands]
    return "\n".join(lines)


async def reset_command(ctx: CommandContext) -> str:
    """Forget this conversation and start afresh."""
    await ctx.memory.reset(ctx.message.key)
    return "Okay, I've forgotten our conversation. Let's start afresh."


def setup(registry: PluginRegistry) -> None:
    """Register the built-in commands."""
    registry.add_command("help", help_command, "show this list")
    registry.add_command("reset", reset_command, "forget this conversation")

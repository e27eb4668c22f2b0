"""The commands every bot has: ``/help`` and ``/reset``."""

from __future__ import annotations

from core.plugins import CommandContext, PluginRegistry


async def help_command(ctx: CommandContext) -> str:
    """List the commands this bot understands."""
    lines = ["Commands:"]
    for cmd in ctx.registry.commands:
        if cmd.admin and not ctx.admin:
            continue  # admins' commands are listed to admins only
        head = f"/{cmd.name} {cmd.usage}".rstrip()
        lines.append(f"{head} - {cmd.help}" if cmd.help else head)
    return "\n".join(lines)


async def reset_command(ctx: CommandContext) -> str:
    """Forget this conversation and start afresh."""
    await ctx.memory.reset(ctx.message.key)
    return "Okay, I've forgotten our conversation. Let's start afresh."


def setup(registry: PluginRegistry) -> None:
    """Register the built-in commands."""
    registry.add_command("help", help_command, "show this list")
    registry.add_command("reset", reset_command, "forget this conversation")

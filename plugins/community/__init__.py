"""The community plugin: /forget, /roll, and moderator commands bound to moderation state.

    [plugins]
    modules = ["plugins.community"]
    admins = {discord = ["1234"], telegram = ["5678"]}   # who may moderate, per channel

``/help`` and ``/reset`` are every bot's. ``/forget`` deletes everything kept about the
user, across conversations and linked accounts. ``/warn``, ``/mute``, ``/unmute`` and
``/audit`` are for the channel's admins and act on the moderation state the filters use
(``[moderation] backend = "filters"``), so a mute here is the mute the filters enforce.
"""

from __future__ import annotations

import random
import re
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.plugins import CommandContext, CommandError, Plugin

NAME = "community"

_DICE = re.compile(r"^(\d{0,3})d(\d{1,4})([+-]\d{1,4})?$", re.IGNORECASE)


class Config(BaseModel):
    """``[plugins.community]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_dice: int = Field(default=100, ge=1, le=1000)
    max_sides: int = Field(default=1000, ge=2, le=10_000)
    warn_points: float = Field(default=2.0, gt=0.0)
    mute_minutes: float = Field(default=10.0, gt=0.0)
    audit_entries: int = Field(default=10, ge=1, le=100)


def roll(spec: str, config: Config, rng: random.Random) -> str:
    """``NdM[+K]`` rolled: each die and the total."""
    match = _DICE.match(spec.strip() or "1d6")
    if match is None:
        raise CommandError("usage: /roll NdM[+K], e.g. /roll 2d6+1")
    count, sides = int(match.group(1) or 1), int(match.group(2))
    bonus = int(match.group(3) or 0)
    if not 1 <= count <= config.max_dice or not 2 <= sides <= config.max_sides:
        raise CommandError(f"Between 1 and {config.max_dice} dice of 2 to "
                           f"{config.max_sides} sides, please.")
    dice = [rng.randint(1, sides) for _ in range(count)]
    total = sum(dice) + bonus
    shown = " + ".join(map(str, dice)) if count > 1 else str(dice[0])
    extra = f" {match.group(3)[0]} {abs(bonus)}" if bonus else ""
    return f"🎲 {spec.strip() or '1d6'}: {shown}{extra} = {total}" if (count > 1 or bonus) \
        else f"🎲 {spec.strip() or '1d6'}: {total}"


def setup(registry: Plugin, config: Config) -> None:
    """Register the community commands."""
    rng = random.Random()
    state_of = _state(registry)

    async def forget(ctx: CommandContext) -> str:
        async def everything() -> None:
            await ctx.registry.forget_user(ctx.message.channel, ctx.message.user_id)

        # Last: answering this very message writes records about the user (its dedupe
        # record, the conversation's members), which must go too.
        ctx.after_reply(everything)
        return ("Done: I deleted everything I kept about you, on every account you "
                "linked.")

    async def roll_command(ctx: CommandContext) -> str:
        return roll(ctx.args, config, rng)

    async def warn(ctx: CommandContext) -> str:
        user, reason = _target(ctx, "/warn USER [reason]")
        state = state_of()
        policy = _policy(registry, ctx)
        score = await state.add_points(f"{ctx.message.channel}:{user}", config.warn_points,
                                       policy.half_life)
        await state.record(_entry(ctx, user, "warn", reason))
        # Replies name no one: they are kept (briefly) as this message's dedupe record,
        # which the warned user's /forget would not reach.
        return f"Warned (violation score now {score:.1f})."

    async def mute(ctx: CommandContext) -> str:
        if not ctx.argv:
            raise CommandError("usage: /mute USER [minutes] [reason]")
        user = ctx.argv[0]
        minutes = config.mute_minutes
        rest = list(ctx.argv[1:])
        if rest and _number(rest[0]) is not None:
            minutes = float(rest.pop(0))
        if not 0 < minutes <= 7 * 24 * 60:
            raise CommandError("Mute for 1 minute to 7 days.")
        await state_of().record(_entry(ctx, user, "mute", " ".join(rest)),
                                mute_user=f"{ctx.message.channel}:{user}",
                                mute_seconds=minutes * 60)
        return f"Muted for {minutes:g} minute(s)."

    async def unmute(ctx: CommandContext) -> str:
        user, _ = _target(ctx, "/unmute USER")
        was = await state_of().unmute(f"{ctx.message.channel}:{user}")
        await state_of().record(_entry(ctx, user, "unmute", ""))
        return "Unmuted." if was else "Not muted."

    async def audit(ctx: CommandContext) -> str:
        count = int(ctx.argv[0]) if ctx.argv and ctx.argv[0].isdigit() else config.audit_entries
        rows = await state_of().read_audit(min(count, 100))
        if not rows:
            return "The audit log is empty."
        lines = [f"Last {len(rows)} moderation entries (newest first):"]
        for row in rows:
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(_seconds(row)))
            what = row.get("action", "?")
            why = row.get("reason") or row.get("policy") or ""
            lines.append(f"{when} {row.get('channel', '?')}:{row.get('user', '?')} "
                         f"{what} {why}".rstrip())
        return "\n".join(lines)

    registry.add_command("forget", forget, "delete everything I keep about you")
    registry.add_command("roll", roll_command, "roll dice", usage="[NdM+K]")
    registry.add_command("warn", warn, "warn a user", usage="USER [reason]", admin=True)
    registry.add_command("mute", mute, "mute a user", usage="USER [minutes] [reason]",
                         admin=True)
    registry.add_command("unmute", unmute, "lift a mute", usage="USER", admin=True)
    registry.add_command("audit", audit, "recent moderation entries", usage="[N]",
                         admin=True)


def _state(registry: Plugin) -> Any:
    def state() -> Any:
        found = getattr(registry.services.moderator, "state", None)
        if found is None:
            raise CommandError("Moderation is off for this bot ([moderation] backend).")
        return found

    return state


def _policy(registry: Plugin, ctx: CommandContext) -> Any:
    settings = getattr(registry.services.moderator, "settings", None)
    if settings is None:
        raise CommandError("Moderation is off for this bot ([moderation] backend).")
    return settings.moderation.for_channel(ctx.message.channel)


def _target(ctx: CommandContext, usage: str) -> tuple[str, str]:
    if not ctx.argv:
        raise CommandError(f"usage: {usage}")
    return ctx.argv[0], " ".join(ctx.argv[1:])


def _entry(ctx: CommandContext, user: str, action: str, reason: str) -> dict[str, str]:
    # Moderators' notes are theirs; users' own messages never go into the log.
    return {"ts": f"{time.time():.3f}", "bot": ctx.message.bot,
            "channel": ctx.message.channel, "conversation": ctx.message.conversation_id,
            "user": user, "stage": "moderator", "policy": f"moderator:{action}",
            "action": action, "reason": reason[:200], "by": ctx.message.user_id}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _seconds(row: dict[str, str]) -> float:
    raw = row.get("ts") or row.get("id", "0").split("-")[0]
    try:
        value = float(raw)
    except ValueError:
        return 0.0
    return value / 1000 if value > 1e11 else value

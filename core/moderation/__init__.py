"""Moderation: input checks before the pipeline, a guard on the output stream."""

from core.moderation.base import Action, Moderator, Verdict, moderators

__all__ = ["Action", "Moderator", "Verdict", "moderators"]

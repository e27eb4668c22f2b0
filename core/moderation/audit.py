"""Audit entries: who, where, which policy, what scores, what action -- never the text.

The content is identified by a keyed hash (BLAKE2b), so repeated posts of one message
can be matched without storing it; the key (``[moderation] audit_key``, from the
environment) keeps short secrets such as phone numbers from being guessed from their
hash. Without a key the bot's name is used, which only separates bots.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping

from core.moderation.policy import Decision
from core.types import IncomingMessage


class Auditor:
    """Builds audit entries for one bot."""

    def __init__(self, bot: str, key: str | None = None) -> None:
        self.bot = bot
        self._key = (key or f"parley-audit:{bot}").encode()[:64]

    def content_hash(self, text: str) -> str:
        """A keyed hash of ``text``: equal texts, equal hashes; the text can't be read back."""
        return hashlib.blake2b(text.encode(), key=self._key, digest_size=16).hexdigest()

    def entry(
        self, message: IncomingMessage, stage: str, decision: Decision, content: str,
        *, degraded: tuple[str, ...] = (), scores: Mapping[str, float] | None = None,
    ) -> dict[str, str]:
        """The audit entry of one decision (all values strings, as a Redis stream wants)."""
        all_scores = {f.kind: round(f.score, 4) for f in decision.findings}
        all_scores.update({k: round(v, 4) for k, v in (scores or {}).items()})
        all_scores["violation"] = round(decision.violation_score, 4)
        return {
            "ts": f"{time.time():.3f}",
            "bot": self.bot,
            "channel": message.channel,
            "conversation": message.conversation_id,
            "user": message.user_id,
            "message": message.message_id,
            "stage": stage,
            "policy": ",".join(f.label() for f in decision.findings) or "-",
            "scores": json.dumps(all_scores, sort_keys=True),
            "action": str(decision.action),
            "hash": self.content_hash(content),
            "degraded": ",".join(degraded),
        }

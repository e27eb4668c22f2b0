"""Prompt-injection heuristics: text that tries to speak as the system, not as a user.

Three families, each adding to a score (1.0 by default is enough to act):

- role and delimiter tokens of chat templates (``<|im_start|>``, ``[INST]``,
  ``<<SYS>>``, ``### System:``) that a user has no reason to type;
- "ignore previous instructions" and its relatives (disregard / forget / override the
  rules, reveal the system prompt, "you are now DAN", developer mode);
- invisible text: characters that show nothing, used to hide instructions.

Phrases are matched on the normalised words, so spacing and leetspeak don't hide them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.moderation.normalise import Normalised

_TOKENS = re.compile(
    r"<\|(?:im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id"
    r"|end_header_id|begin_of_text)\|>"
    r"|\[/?INST\]|<</?SYS>>|</?s>|<start_of_turn>|<end_of_turn>"
    r"|^\s*#{2,}\s*(?:system|instruction|assistant)\s*:?"
    r"|^\s*(?:system|assistant)\s*:",
    re.IGNORECASE | re.MULTILINE,
)

_VERBS = r"(?:ignore|disregard|forget|skip|override|bypass|drop)"
_WHICH = r"(?:all |any |the |your |these |those |every |of )*"
_WHEN = r"(?:previous|prior|above|earlier|preceding|original|initial|system|old|existing|all)"
_WHAT = r"(?:instructions?|prompts?|rules?|directions?|guidelines?|directives?|orders?" \
        r"|constraints?|restrictions?|programming)"
_PHRASES = re.compile(
    rf"\b{_VERBS} {_WHICH}{_WHEN} {_WHAT}\b"
    rf"|\b{_VERBS} (?:all |everything )(?:you were |you've been |you have been )?told\b"
    rf"|\b{_VERBS} {_WHICH}(?:your |the )?{_WHAT} (?:above|before|so far)\b"
    r"|\b(?:reveal|show|print|repeat|output|display|leak|tell me) (?:me )?"
    r"(?:your |the )(?:full |exact |hidden |secret |original |initial )*"
    r"(?:system prompt|system message|initial prompt|hidden prompt)\b"
    # "the instructions" alone is how customers ask for a manual.
    r"|\b(?:reveal|show|print|repeat|output|display|leak|tell me) (?:me )?"
    r"(?:your (?:\w+ )?|the (?:full |exact |hidden |secret |original |initial |system )+)"
    r"instructions\b"
    r"|\byou are now (?:dan|a jailbroken|an? unrestricted|in developer mode|free from)\b"
    r"|\b(?:developer|god|dan|jailbreak) mode (?:enabled|on|activated)\b"
    r"|\bdo anything now\b"
    r"|\bpretend (?:that )?(?:you are|to be) (?:an? )?(?:ai |model |assistant )?"
    r"(?:without|with no) (?:any )?(?:rules|restrictions|filters|limits)\b"
    r"|\bnew instructions?\s*:",
)
_WEIGHTS = {"token": 1.0, "phrase": 1.0, "invisible": 1.0, "stray_invisible": 0.5}


@dataclass(frozen=True, slots=True)
class InjectionReport:
    """How much a message looks like an injection, and why."""

    score: float
    signals: tuple[str, ...]


def check_injection(raw: str, text: Normalised) -> InjectionReport:
    """Score ``raw`` (as the user sent it) and its normalised form ``text``."""
    signals: list[str] = []
    if text.invisible:
        # One stray zero-width space is copy-paste; several hide something.
        signals.append("invisible" if text.invisible >= 3 else "stray_invisible")
    if _TOKENS.search(text.clean):
        signals.append("token")
    if _PHRASES.search(text.key) or _PHRASES.search(text.clean.lower()):
        signals.append("phrase")
    return InjectionReport(sum(_WEIGHTS[s] for s in signals), tuple(signals))

"""Personal data in text: e-mail addresses, phone numbers, card numbers, IBANs.

Each detector is a pattern plus an optional check (Luhn for cards, mod-97 for IBANs)
that keeps look-alikes (order numbers, dates) out. More detectors register under a name
in :data:`DETECTORS` and are chosen by ``[moderation] pii = [...]``. A found span is
replaced by ``[email]``, ``[phone]``, ... before the text reaches memory, the model, a
user or a log.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from core.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Span:
    """One piece of personal data: where it is and what kind it is."""

    start: int
    end: int
    kind: str


@dataclass(frozen=True, slots=True)
class Detector:
    """A pattern, and a check that a match really is what it looks like."""

    kind: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool] = lambda found: True
    hint: Callable[[str], bool] = lambda text: True  # cheap pre-test before the regex
    # A pre-test too: the text holds at least this many digits (a card has 13, a phone
    # 7), so the patterns are not run over the many messages that cannot hold one.
    digits: int = 0


def luhn_ok(number: str) -> bool:
    """Whether the digits of ``number`` pass the Luhn check (card numbers do)."""
    digits = [int(c) for c in number if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, digit in enumerate(reversed(digits)):
        if i % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """Whether ``text`` is an IBAN with a right mod-97 check."""
    compact = re.sub(r"[\s-]", "", text).upper()
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    try:
        return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1
    except ValueError:
        return False


_DATE = re.compile(r"\d{4}[./-]\d{1,2}[./-]\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}")


def _phone_ok(text: str) -> bool:
    digits = sum(c.isdigit() for c in text)
    return 7 <= digits <= 15 and not _DATE.fullmatch(text.strip())


_DIGIT = re.compile(r"\d")  # any Unicode digit, as the patterns' \d
_NOT_DIGITS = bytes(b for b in range(128) if not 0x30 <= b <= 0x39)


def _digits(text: str) -> int:
    """How many digits ``text`` has (an ASCII text's are counted in C, without a list)."""
    if text.isascii():
        return len(text.encode("ascii").translate(None, _NOT_DIGITS))
    return len(_DIGIT.findall(text))


# ASCII letters as "a", digits as "0", any other byte as " ".
_CLASSES = bytes(0x61 if chr(b).isascii() and chr(b).isalpha()
                 else 0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))


def _iban_hint(text: str) -> bool:
    """Whether ``text`` may hold an IBAN: two ASCII letters then two digits (the
    pattern's start), looked for in C for ASCII text; any other text may."""
    return not text.isascii() or b"aa00" in text.encode("ascii").translate(_CLASSES)


DETECTORS: Mapping[str, Detector] = {
    "email": Detector(
        "email",
        re.compile(r"[A-Za-z0-9._%+-]+\s*(?:@|\(at\)|\[at\])\s*[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
                   r"\.[A-Za-z]{2,}"),
        hint=lambda text: "@" in text or "(at)" in text or "[at]" in text,
    ),
    "card": Detector(
        "card", re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)"), luhn_ok, digits=13
    ),
    "iban": Detector(
        "iban",
        re.compile(r"\b[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]{4}){2,7}(?:[ -]?[A-Za-z0-9]{1,4})?\b"),
        iban_ok,
        hint=_iban_hint,
        digits=2,
    ),
    "phone": Detector(
        "phone",
        re.compile(r"(?<![\w+])(?:\+|00)?\d{1,4}(?:[ .-]?\(?\d{1,5}\)?){1,5}[ .-]?\d{2,5}(?!\w)"
                   r"|(?<![\w+])\(\d{2,5}\)[ .-]?\d{2,5}(?:[ .-]?\d{2,5}){1,3}(?!\w)"),
        _phone_ok,
        digits=7,
    ),
}


class PiiDetector:
    """Finds and masks the kinds of personal data it was built with."""

    def __init__(self, kinds: Iterable[str], detectors: Mapping[str, Detector] = DETECTORS):
        try:
            # Cards and IBANs before phones: a card number looks like a long phone number.
            order = ("email", "card", "iban", "phone")
            chosen = sorted(kinds, key=lambda k: order.index(k) if k in order else len(order))
            self._detectors = [detectors[kind] for kind in chosen]
        except KeyError as exc:
            known = ", ".join(sorted(detectors))
            raise ConfigError(f"moderation.pii: unknown kind {exc} (known: {known})") from None

    @property
    def kinds(self) -> list[str]:
        """The kinds of data this detector looks for."""
        return [d.kind for d in self._detectors]

    def find(self, text: str) -> list[Span]:
        """The spans of personal data in ``text``, in order, not overlapping."""
        spans: list[Span] = []
        digits = -1  # counted once, for the first detector that asks
        for detector in self._detectors:
            if detector.digits:
                if digits < 0:
                    digits = _digits(text)
                if digits < detector.digits:
                    continue
            if not detector.hint(text):
                continue
            for match in detector.pattern.finditer(text):
                start, end = match.span()
                if any(s.start < end and start < s.end for s in spans):
                    continue
                if detector.valid(match.group()):
                    spans.append(Span(start, end, detector.kind))
        if len(spans) > 1:
            spans.sort(key=lambda s: s.start)
        return spans

    @staticmethod
    def mask(text: str, spans: Iterable[Span]) -> str:
        """``text`` with each span replaced by ``[kind]``."""
        out: list[str] = []
        at = 0
        for span in spans:
            out.append(text[at:span.start])
            out.append(f"[{span.kind}]")
            at = span.end
        out.append(text[at:])
        return "".join(out)

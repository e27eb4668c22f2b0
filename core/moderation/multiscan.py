"""Many regular expressions over one text at once: a Hyperscan prefilter, ``re`` to confirm.

The moderation checks ask, of each message, which of a few hundred Python regexes match.
Tried one after another (or as one big alternation) by ``re``, that is most of the cost of
checking a message. Hyperscan scans for all of them in one pass over the text; here it
is a *prefilter* only: each Python pattern is translated to a byte pattern that matches
wherever the Python one does (and sometimes where it does not), the text is scanned
once, and only the patterns it reports are run by ``re``. So the answers are always
``re``'s own -- the translation may be loose, never strict -- and without Hyperscan (not
installed, another platform) every pattern is simply run by ``re``.

The translation, on the UTF-8 bytes of the text: ASCII is matched exactly (with Python's
case-insensitive equivalents of ASCII letters, such as the Kelvin sign for ``k``); any
other character is matched by "one or more non-ASCII bytes"; lookarounds match nothing
(always true); ``\\b`` is kept where one side is sure to be an ASCII word character (there
bytes and characters agree) and dropped elsewhere; other anchors are dropped.

Databases are compiled once per set of patterns, on first use (or by :meth:`prepare`, off
the event loop), and shared.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

hyperscan: Any
try:
    import hyperscan
except ImportError:  # pragma: no cover - where hyperscan is not a dependency
    hyperscan = None

log = logging.getLogger(__name__)

# Non-ASCII characters that Python's ``re.IGNORECASE`` takes for an ASCII letter
# (re._casefix and the simple lowercase mapping); tests/test_multiscan.py checks the
# table against ``re`` itself over every code point.
_CASE_EXTRA = {"i": "\u0130\u0131", "k": "\u212a", "s": "\u017f"}
_NON_ASCII = rb"[\x80-\xff]+"  # one character, loosely: any run of non-ASCII bytes
_WORD = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")


class Untranslatable(ValueError):
    """A construct the prefilter has no loose form of (a backreference, a condition)."""


def _byte(b: int) -> bytes:
    return b"\\x%02x" % b


def _klass(members: Iterable[int]) -> bytes:
    return b"[" + b"".join(_byte(b) for b in sorted(members)) + b"]"


class _Translator:
    """One Python pattern to a Hyperscan byte pattern that matches at least as much."""

    def __init__(self, flags: int) -> None:
        self.flags = flags

    # -- what a node can start or end with, to keep \b where bytes agree with characters

    def _nullable(self, node: tuple[Any, Any]) -> bool:
        op, av = node
        if op in (sre.AT, sre.ASSERT, sre.ASSERT_NOT):
            return True
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            return bool(av[0] == 0 or self._seq_nullable(av[2]))
        if op is sre.SUBPATTERN:
            return self._seq_nullable(av[3])
        if op is sre.ATOMIC_GROUP:
            return self._seq_nullable(av)
        if op is sre.BRANCH:
            return any(self._seq_nullable(alt) for alt in av[1])
        return False

    def _seq_nullable(self, seq: Sequence[tuple[Any, Any]]) -> bool:
        return all(self._nullable(n) for n in seq)

    def _word_edge(self, node: tuple[Any, Any], last: bool) -> bool:
        """Whether every character ``node`` can start (``last``: end) with is an ASCII
        word character; zero-width nodes have none, so vacuously yes."""
        op, av = node
        if op is sre.LITERAL:
            return av in _WORD and not (self.flags & re.IGNORECASE and chr(av).lower() in "iks")
        if op is sre.IN:
            members = self._ascii_members(av)
            return members is not None and members[1] is False and members[0] <= _WORD
        if op in (sre.AT, sre.ASSERT, sre.ASSERT_NOT):
            return True
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            return self._seq_word_edge(av[2], last)
        if op is sre.SUBPATTERN:
            return self._inner(av)._seq_word_edge(av[3], last)
        if op is sre.BRANCH:
            return all(self._seq_word_edge(alt, last) for alt in av[1])
        return False  # not known: not sure

    def _inner(self, subpattern: tuple[Any, int, int, Any]) -> _Translator:
        """The translator of a group's body, with the group's own flags (``(?i:...)``)."""
        _, add, remove, _ = subpattern
        return _Translator((self.flags | add) & ~remove)

    def _seq_word_edge(self, seq: Sequence[tuple[Any, Any]], last: bool) -> bool:
        for node in reversed(seq) if last else seq:
            if not self._word_edge(node, last):
                return False
            if not self._nullable(node):
                return True
        return True  # all nullable: the characters come from elsewhere (checked there)

    def _boundary_safe(self, seq: Sequence[tuple[Any, Any]], i: int) -> bool:
        """Whether ``\\b`` at ``seq[i]`` has an ASCII word character on one side for
        sure (then Hyperscan's ASCII ``\\b`` holds wherever Python's does)."""
        return (self._side_is_word(list(reversed(seq[:i])), last=True)
                or self._side_is_word(list(seq[i + 1:]), last=False))

    def _side_is_word(self, nodes: Sequence[tuple[Any, Any]], last: bool) -> bool:
        for node in nodes:
            if not self._word_edge(node, last):
                return False
            if not self._nullable(node):
                return True
        return False  # the character is outside this sequence: not known

    # -- character sets ------------------------------------------------------------------

    def _ascii_members(self, items: Sequence[tuple[Any, Any]]
                       ) -> tuple[frozenset[int], bool] | None:
        """The ASCII bytes a class matches (case variants included) and whether it can
        match a non-ASCII character; None if it has a part not understood."""
        negate = False
        tests: list[Any] = []
        non_ascii = False
        for op, av in items:
            if op is sre.NEGATE:
                negate = True
            elif op is sre.LITERAL:
                tests.append(lambda c, av=av: ord(c) == av)
                non_ascii |= av >= 128
            elif op is sre.RANGE:
                tests.append(lambda c, lo=av[0], hi=av[1]: lo <= ord(c) <= hi)
                non_ascii |= av[1] >= 128
            elif op is sre.CATEGORY:
                test = _CATEGORIES.get(av)
                if test is None:
                    return None
                tests.append(test)
                non_ascii = True
            else:
                return None
        ignorecase = bool(self.flags & re.IGNORECASE)

        def member(c: str) -> bool:
            variants = {c}
            if ignorecase:
                variants |= {c.lower(), c.upper(), *_CASE_EXTRA.get(c.lower(), "")}
            return any(t(v) for t in tests for v in variants)

        ascii_set = frozenset(b for b in range(128) if member(chr(b)) != negate)
        if ignorecase and any(chr(b) in _CASE_EXTRA for b in ascii_set):
            non_ascii = True
        return ascii_set, non_ascii or negate

    def _set(self, items: Sequence[tuple[Any, Any]]) -> bytes:
        members = self._ascii_members(items)
        if members is None:
            raise Untranslatable(f"character class {items!r}")
        ascii_set, non_ascii = members
        # Only literal non-ASCII members (and ASCII ranges), none case-folded: those
        # exactly; anything else non-ASCII loosely.
        literals = [av for op, av in items if op is sre.LITERAL and av >= 128]
        exact = not (self.flags & re.IGNORECASE) and all(
            op is sre.LITERAL or (op is sre.RANGE and av[1] < 128) for op, av in items)
        parts = [_klass(ascii_set)] if ascii_set else []
        if exact:
            parts += [_utf8(chr(av)) for av in literals]
        elif non_ascii:
            parts.append(_NON_ASCII)
        if not parts:
            return b"[^\\x00-\\xff]"  # matches nothing
        return b"(?:" + b"|".join(parts) + b")"

    # -- nodes ---------------------------------------------------------------------------

    def seq(self, seq: Sequence[tuple[Any, Any]]) -> bytes:
        out = []
        for i, (op, av) in enumerate(seq):
            if op is sre.AT and av is sre.AT_BOUNDARY:
                out.append(b"\\b" if self._boundary_safe(seq, i) else b"")
            else:
                out.append(self.node(op, av))
        return b"".join(out)

    def node(self, op: Any, av: Any) -> bytes:
        if op is sre.LITERAL:
            c = chr(av)
            if self.flags & re.IGNORECASE and c.lower() != c.upper():
                if not c.isascii():
                    return b"(?:[\\x00-\\x7f]|" + _NON_ASCII + b")"
                extra = [_utf8(x) for x in _CASE_EXTRA.get(c.lower(), "")]
                return b"(?:" + b"|".join([_klass({ord(c.lower()), ord(c.upper())}), *extra]) + b")"
            return _utf8(c)
        if op is sre.NOT_LITERAL:
            return b"(?:[\\x00-\\x7f]|" + _NON_ASCII + b")"
        if op is sre.ANY:
            return b"(?:[\\x00-\\x7f]|" + _NON_ASCII + b")" if self.flags & re.DOTALL \
                else b"(?:[\\x00-\\x09\\x0b-\\x7f]|" + _NON_ASCII + b")"
        if op is sre.IN:
            return self._set(av)
        if op is sre.BRANCH:
            return b"(?:" + b"|".join(self.seq(alt) for alt in av[1]) + b")"
        if op is sre.SUBPATTERN:
            return b"(?:" + self._inner(av).seq(av[3]) + b")"
        if op is sre.ATOMIC_GROUP:
            return b"(?:" + self.seq(av) + b")"
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            lo, hi, body = av
            bound = b"{%d,}" % lo if hi is sre.MAXREPEAT else b"{%d,%d}" % (lo, hi)
            return b"(?:" + self.seq(body) + b")" + bound
        if op is sre.AT:
            if av is sre.AT_BEGINNING_LINE and self.flags & re.MULTILINE:
                return b"^"
            return b""  # dropped: looser
        if op in (sre.ASSERT, sre.ASSERT_NOT):
            return b""  # always true: looser
        raise Untranslatable(f"{op} {av!r}")


def _utf8(c: str) -> bytes:
    return b"".join(_byte(b) if not (b < 128 and (chr(b).isalnum() or chr(b) == " "))
                    else bytes([b]) for b in c.encode("utf-8", "surrogatepass"))


_CATEGORIES: dict[Any, Any] = {
    sre.CATEGORY_DIGIT: lambda c: c.isdecimal(),
    sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    sre.CATEGORY_SPACE: lambda c: c.isspace(),
    sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    sre.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
}


def translate(pattern: str, flags: int = 0) -> bytes:
    """A Hyperscan byte pattern matching (the UTF-8 of) every text ``pattern`` matches
    with ``flags``, and maybe more; raises :class:`Untranslatable`."""
    tree = sre_parse.parse(pattern, flags)
    return _Translator(tree.state.flags).seq(list(tree))


def alternatives(pattern: str) -> list[str]:
    """``pattern`` split at its top-level ``|``: the parts one of which must match."""
    if re.match(r"\(\?[aiLmsux]+\)", pattern):
        raise ValueError("flags of the whole pattern would stay with its first part")
    parts: list[str] = []
    depth, start, i, in_class = 0, 0, 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if pattern.startswith(("[]", "[^]"), i):  # a leading "]" is a member
                i += 1 + (pattern[i + 1] == "^")
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    parts.append(pattern[start:])
    return parts


class RegexSet:
    """Python patterns over one text: whether (and which of) them match, as ``re``
    decides, found with one Hyperscan pass where it is installed (see the module
    docstring)."""

    def __init__(self, patterns: Sequence[str], flags: int = 0) -> None:
        self.patterns = tuple(patterns)
        self.flags = flags

    # Compiled on first use, not at import.
    @functools.cached_property
    def compiled(self) -> tuple[re.Pattern[str], ...]:
        """Each pattern, compiled by ``re``."""
        return tuple(re.compile(p, self.flags) for p in self.patterns)

    @functools.cached_property
    def _any(self) -> re.Pattern[str]:
        return re.compile("|".join(f"(?:{p})" for p in self.patterns), self.flags)

    @functools.cached_property
    def _scanner(self) -> _Scanner | None:
        return _database(self.patterns, self.flags)

    def prepare(self) -> bool:
        """Compile the patterns and the Hyperscan database now (it takes a second: call
        it off the event loop); whether there is a database."""
        scanning = self._scanner is not None
        _ = self.compiled if scanning else self._any  # what search() will need
        return scanning

    @property
    def scanning(self) -> bool:
        """Whether Hyperscan scans for these patterns (else ``re`` runs them all)."""
        return self._scanner is not None

    def candidates(self, text: str) -> list[int] | None:
        """The indexes of the patterns that may match ``text``, ascending; None without
        Hyperscan (then any may)."""
        scanner = self._scanner
        return scanner.scan(text) if scanner is not None else None

    def may_match(self, text: str) -> bool:
        """False only where no pattern matches ``text`` (found by one scan, confirmed by
        re); without Hyperscan nothing is run and the answer is True: the caller's own
        patterns decide."""
        scanner = self._scanner
        if scanner is None:
            return True
        return self.confirmed(scanner.scan(text), text)

    def search(self, text: str) -> bool:
        """Whether any pattern matches ``text``."""
        scanner = self._scanner
        if scanner is None:
            return self._any.search(text) is not None
        return self.confirmed(scanner.scan(text), text)

    def confirmed(self, ids: Sequence[int], text: str) -> bool:
        """Whether one of the patterns ``ids`` (the candidates of a scan of ``text``, as
        :class:`ViewSets` gives them) matches ``text``, as ``re`` decides."""
        # Most texts have no candidate: no generator, no lookup of the compiled patterns.
        if not ids:
            return False
        compiled = self.compiled
        return any(compiled[i].search(text) for i in ids)


class _Scanner:
    """A compiled Hyperscan database, and a scratch space per thread to scan with."""

    def __init__(self, database: Any, always: Sequence[int]) -> None:
        self._database = database
        self._always = tuple(always)  # patterns with no prefilter form: always candidates
        self._local = threading.local()

    def scan(self, text: str) -> list[int]:
        hits = list(self._always) if self._always else []
        database = self._database
        if database is not None:
            try:
                scratch = self._local.scratch
            except AttributeError:
                scratch = self._local.scratch = hyperscan.Scratch(database)
            database.scan(text.encode("utf-8", "surrogatepass"), match_event_handler=_collect,
                          context=hits, scratch=scratch)
            if len(hits) > 1:
                hits.sort()
        return hits


def _collect(index: int, start: int, end: int, flags: int, hits: list[int]) -> None:
    hits.append(index)


def _database(patterns: tuple[str, ...], flags: int) -> _Scanner | None:
    """The Hyperscan database of ``patterns`` (None without Hyperscan); built once."""
    return _flagged_database(tuple((p, flags) for p in patterns))


@functools.cache
def _flagged_database(patterns: tuple[tuple[str, int], ...]) -> _Scanner | None:
    """The Hyperscan database of ``patterns``, each with its own ``re`` flags (None
    without Hyperscan); built once."""
    if hyperscan is None:
        return None
    try:
        return _build(patterns)
    except hyperscan.error as exc:
        # A CPU Hyperscan does not support, say: the same answers, by re alone.
        log.warning("moderation: no one-pass scanner (%s: %s); patterns run one by one",
                    type(exc).__name__, exc)
        return None


def _build(patterns: tuple[tuple[str, int], ...]) -> _Scanner:
    always: list[int] = []
    exprs: list[tuple[bytes, int]] = []  # (expression, Hyperscan flags)
    ids: list[int] = []
    for i, (pattern, flags) in enumerate(patterns):
        try:
            expr = translate(pattern, flags)
        except Untranslatable:
            always.append(i)
            continue
        hs_flags = hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_ALLOWEMPTY
        if flags & re.MULTILINE:
            hs_flags |= hyperscan.HS_FLAG_MULTILINE
        exprs.append((expr, hs_flags))
        ids.append(i)

    def compiled(exprs: list[tuple[bytes, int]], ids: list[int]) -> Any:
        database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        database.compile(expressions=[e for e, _ in exprs], ids=ids, elements=len(exprs),
                         flags=[f for _, f in exprs])
        return database

    try:
        database = compiled(exprs, ids) if exprs else None
    except hyperscan.error:
        # One pattern Hyperscan refuses (too large, say) costs only itself.
        keep = []
        for flagged, i in zip(exprs, ids, strict=True):
            try:
                compiled([flagged], [i])
                keep.append((flagged, i))
            except hyperscan.error:
                always.append(i)
        database = compiled([e for e, _ in keep], [i for _, i in keep]) if keep else None
    return _Scanner(database, sorted(always))


class ViewSets:
    """Several :class:`RegexSet`, each looked for in one view of a message (its clean
    text, its normalised words, ...), found in one Hyperscan pass over all the views.

    The views are scanned side by side, a newline between two: every translated pattern
    matches (the UTF-8 of) its view wherever the Python pattern does, and so the whole
    wherever it matches a view (anchors other than a multi-line ``^`` are dropped, and a
    kept ``\b`` or ``^`` holds after a newline as at the start of a text); a pattern
    found in another view than its own, or across the newline, is one more candidate,
    which ``re`` then turns down in its own view. A pattern in several sets (or views)
    is compiled once.
    """

    def __init__(self, members: Sequence[tuple[RegexSet, str]]) -> None:
        self.members = tuple(members)
        self.views = tuple(dict.fromkeys(view for _, view in self.members))
        unique: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for m, (regex_set, _) in enumerate(self.members):
            for i, pattern in enumerate(regex_set.patterns):
                unique.setdefault((pattern, regex_set.flags), []).append((m, i))
        self._patterns = tuple(unique)
        # Each compiled pattern's (member, index in the member's set) pairs.
        self._owners = tuple(tuple(owners) for owners in unique.values())
        self._none: tuple[tuple[int, ...], ...] = ((),) * len(self.members)

    @functools.cached_property
    def _scanner(self) -> _Scanner | None:
        return _flagged_database(self._patterns)

    def prepare(self) -> bool:
        """Compile the members' patterns and the one Hyperscan database now (seconds:
        off the event loop); whether there is a database."""
        scanning = self._scanner is not None
        for regex_set, _ in self.members:
            _ = regex_set.compiled if scanning else regex_set._any
        return scanning

    def scan(self, views: Mapping[str, str]) -> Sequence[Sequence[int]] | None:
        """Each member's candidates in ``views`` (view name -> text), ascending, in the
        members' order; None without Hyperscan (then any pattern may match)."""
        scanner = self._scanner
        if scanner is None:
            return None
        hits = scanner.scan("\n".join([views[name] for name in self.views]))
        if not hits:
            return self._none
        found: list[list[int]] = [[] for _ in self.members]
        owners = self._owners
        for hit in hits:
            for m, i in owners[hit]:
                found[m].append(i)
        for ids in found:
            if len(ids) > 1:
                ids.sort()
        return found

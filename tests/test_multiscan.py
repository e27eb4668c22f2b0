"""The one-pass prefilter of the moderation patterns (core/moderation/multiscan.py): the
Hyperscan path decides exactly as ``re`` alone, on the labelled sets, the tests' own
texts and random text, and every pattern it does not report cannot match."""

from __future__ import annotations

import ast
import json
import platform
import re
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from core.moderation import builtin_terms, injection, multiscan, spam
from core.moderation.injection import check_injection
from core.moderation.input import MESSAGE_SETS
from core.moderation.multiscan import _CASE_EXTRA, RegexSet, ViewSets, alternatives, translate
from core.moderation.normalise import Normalised, normalise
from core.moderation.patterns import PatternFilter
from core.moderation.spam import check_spam, promotion
from core.moderation.terms import TermFilter, TermHit

ROOT = Path(__file__).resolve().parents[1]
HYPERSCAN_HERE = sys.platform == "linux" and platform.machine() == "x86_64"


def bench_texts() -> list[str]:
    """Every message of bench/data/moderation: development and held-out sets."""
    texts = []
    for path in sorted((ROOT / "bench" / "data" / "moderation").glob("*.jsonl")):
        texts += [json.loads(line)["text"] for line in path.read_text("utf-8").splitlines()
                  if line.strip()]
    return texts


def moderation_test_texts() -> list[str]:
    """Every string literal of the moderation tests (their abuse, benign and edge cases)."""
    found: set[str] = set()
    for path in sorted((ROOT / "tests").glob("test_moderation*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return sorted(found)


SETS = {
    "patterns": (PatternFilter()._set, "key"),
    "injection tokens": (injection._TOKEN_SET, "clean"),
    "injection key": (injection._KEY_SET, "key"),
    "injection lower": (injection._LOWER_SET, "lower"),
    "spam text": (spam._TEXT_SET, "clean"),
    "spam key": (spam._KEY_SET, "key"),
}


def views(text: str) -> dict[str, str]:
    n = normalise(text)
    return {"key": n.key, "clean": n.clean, "lower": n.clean.lower(), "raw": text}


def assert_same(texts: list[str]) -> None:
    fast, exact = PatternFilter(), PatternFilter(prefilter=False)
    blocked = [(t, c) for c, terms in builtin_terms.TERMS.items() for t in terms]
    terms_fast = TermFilter(blocked, builtin_terms.ALLOWED, fast)
    terms_exact = TermFilter(blocked, builtin_terms.ALLOWED, exact)
    for text in texts:
        n = normalise(text)
        assert fast.find(n.key) == exact.find(n.key), text
        assert terms_fast.find_in_message(n) == terms_exact.find_in_message(n), text
        assert check_injection(text, n) == check_injection(text, n, prefilter=False), text
        assert check_spam(n.clean, n.key) == check_spam(n.clean, n.key, prefilter=False), text
        assert promotion(n.clean, n.key) == promotion(n.clean, n.key, prefilter=False), text
        for name, (regex_set, view) in SETS.items():
            subject = views(text)[view]
            found = regex_set.candidates(subject)
            if found is None:
                continue
            matching = [i for i, p in enumerate(regex_set.compiled) if p.search(subject)]
            assert set(matching) <= set(found), (name, text)
        # The input checks' one pass over the message's three views (input.py).
        scanned = MESSAGE_SETS.scan(views(text))
        if scanned is None:
            continue
        for (regex_set, view), found in zip(MESSAGE_SETS.members, scanned, strict=True):
            subject = views(text)[view]
            matching = [i for i, p in enumerate(regex_set.compiled) if p.search(subject)]
            assert set(matching) <= set(found), (view, text)
        assert terms_fast.find_in_message(n, (n.key, scanned[0])) == \
            terms_exact.find_in_message(n), text
        assert check_injection(text, n, candidates=scanned[1:4]) == \
            check_injection(text, n, prefilter=False), text
        assert check_spam(n.clean, n.key, candidates=scanned[4:]) == \
            check_spam(n.clean, n.key, prefilter=False), text


def test_hyperscan_is_used_where_it_is_a_dependency() -> None:
    if not HYPERSCAN_HERE:
        pytest.skip("hyperscan is a dependency on linux x86_64 only")
    assert multiscan.hyperscan is not None, "hyperscan is not installed: run scripts/setup dev"
    for regex_set, _ in SETS.values():
        assert regex_set.prepare()
    assert MESSAGE_SETS.prepare()


def test_fast_path_decides_as_re_on_the_labelled_sets() -> None:
    texts = bench_texts()
    assert len(texts) > 1500
    assert_same(texts)


def test_fast_path_decides_as_re_on_the_moderation_test_texts() -> None:
    texts = moderation_test_texts()
    assert len(texts) > 300
    assert_same(texts)


# Words of the patterns, look-alikes and scripts where bytes and characters differ.
_WORDS = [
    *sorted({w for regex_set, _ in SETS.values() for p in regex_set.patterns
             for w in re.findall(r"[a-z]{2,}", p)}),
    "you", "are", "i", "will", "kill", "idiot", "ignore", "previous", "instructions",
    "http://x.com", "click", "here", "free", "nitro", "100", "$", "a", "day", "dm", "me",
    "中", "你是猪", "杀了你", "é", "ß", "\u017f", "\u212a", "\u0130", "\u0131", "🙂", "\u200b",
    "\n", "<|im_start|>", "[INST]", "### system:", "system:", "_", "-", ",", ".", "!", "  ",
    "\u216b", "\u0663", "\x1c", "\x85", "http", "www", ".com", "/", "<|", "|>", "#", ":",
]


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=14),
       st.lists(st.sampled_from([" ", "", "  ", "\n", "é", "中", "_"]), min_size=14, max_size=14))
def test_fast_path_decides_as_re_on_random_text(words: list[str], gaps: list[str]) -> None:
    assert_same(["".join(w + g for w, g in zip(words, gaps, strict=False))])


@pytest.mark.parametrize(("pattern", "text"), [
    (r"\bfoo", "。foo"), (r"foo\b", "foo。"), (r"中\b", "中。"),
    (r"\b中", " 中"), (r"x \b\w", "x 中"), (r"\w+\b", "中中 "), (r"\b\w\w\b", "éé"),
    (r"a.b", "a中b"), (r"a[^x]b", "aéb"), (r"(?i)k", "\u212a"), (r"(?i)[a-z]s", "a\u017f"),
    (r"^\s*system:", "hi\n  system:"), (r"\d", "\u0663"), (r"\s", "\x1c"),
    (r"(?!no )\w+ x", "nox x"),
])
def test_translation_matches_wherever_python_does(pattern: str, text: str) -> None:
    if multiscan.hyperscan is None:
        pytest.skip("needs hyperscan")
    flags = re.MULTILINE
    regex_set = RegexSet([pattern, "zzz"], flags)
    assert re.search(pattern, text, flags)
    assert regex_set.candidates(text) == [0], translate(pattern, flags)
    assert regex_set.search(text)


@pytest.mark.parametrize(("pattern", "text"), [
    (r"\bfoo", "。foo"), (r"foo\b", "foo。"), (r"^\s*system:", "system: hi"),
    (r"^\s*system:", "hi\n  system:"), (r"\bfoo\b", "foo"), (r"(?!no )\w+ x", "nox x"),
])
def test_views_side_by_side_match_wherever_python_does(pattern: str, text: str) -> None:
    """A pattern is found in its view wherever Python finds it, between other views."""
    if multiscan.hyperscan is None:
        pytest.skip("needs hyperscan")
    view_sets = ViewSets([(RegexSet(["zzz"]), "before"),
                          (RegexSet([pattern, "zzz"], re.MULTILINE), "text"),
                          (RegexSet(["zzz", "yyy"]), "after")])
    found = view_sets.scan({"before": "x x", "text": text, "after": "y"})
    assert found is not None
    assert [list(ids) for ids in found] == [[], [0], []]


def test_alternatives_split_only_at_the_top_level() -> None:
    assert alternatives(r"a|b(?:c|d)|[|]x|\|y") == ["a", "b(?:c|d)", "[|]x", r"\|y"]
    assert alternatives(r"[]|]|z") == ["[]|]", "z"]
    assert alternatives(r"[^]|(]|[[]|[\]|]") == ["[^]|(]", "[[]", r"[\]|]"]
    with pytest.raises(ValueError, match="flags"):
        alternatives("(?i)a|b")


def test_the_case_table_is_what_re_ignorecase_does() -> None:
    """Every non-ASCII character ``re.IGNORECASE`` takes for an ASCII letter is listed."""
    letter = re.compile("[a-z]", re.IGNORECASE)
    found: dict[str, str] = {}
    for code in range(0x80, 0x110000):
        c = chr(code)
        if letter.fullmatch(c):
            ascii_letter = next(a for a in "abcdefghijklmnopqrstuvwxyz"
                                if re.fullmatch(a, c, re.IGNORECASE))
            found[ascii_letter] = found.get(ascii_letter, "") + c
    assert found == _CASE_EXTRA


@hsettings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("aAbBzZ 1!éÉß\u0130中🙂\u212a"), max_size=40))
@example("AAAAAAAAAbbb")  # 9 capitals of 12 letters: the fewest that shout
def test_shouting_is_counted_as_before(text: str) -> None:
    letters = [c for c in text if c.isalpha() and c.isascii()]
    before = len(letters) >= 12 and sum(c.isupper() for c in letters) >= 0.7 * len(letters)
    assert spam.shouts(text) == before


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["lol", "LOL", "hi", "a", "b", "c", "d", "e", "f"]), max_size=16))
def test_repetition_is_judged_as_before(words: list[str]) -> None:
    from collections import Counter

    text = " ".join(words)
    folded = text.casefold().split()
    before = len(folded) >= 6 and (len(set(folded)) <= 4
                                   or Counter(folded).most_common(1)[0][1] * 2 >= len(folded))
    assert (check_spam(text) == "repeat") == before


def old_find(terms: TermFilter, text: Normalised) -> TermHit | None:
    """TermFilter.find as it was before phrases were looked for by their first word."""
    words = text.words
    key = ""
    if terms._allowed_phrases or terms._blocked.phrases:
        key = f" {' '.join(words)} "
        for phrase in terms._allowed_phrases:
            key = key.replace(f" {phrase} ", " ")
        words = tuple(key.split())
    hit = terms._blocked.find(words, terms._allowed_words)
    if hit is not None:
        return hit
    for phrase, category in terms._blocked.phrases:
        if f" {phrase} " in key:
            return TermHit(phrase, category)
    return None


def test_terms_find_as_before() -> None:
    terms = TermFilter.from_policy(["my phrase here", "threat:i will find you"],
                                   ["kill the process twice", "van dyke"])
    texts = bench_texts() + moderation_test_texts() + [
        "kill the process kill the process", "van dyke van dyke", "kill the process twice",
        "i will find you", "suicide squad suicide prevention suicide", "x my phrase here y",
        "you suck and piss off", "hope you die you suck", "go die in a fire kill yourself"]
    for text in texts:
        n = normalise(text)
        assert terms.find(n) == old_find(terms, n), text
        key = f" {n.key} "
        for phrase in terms._allowed_phrases:
            key = key.replace(f" {phrase} ", " ")
        assert terms._without_allowed(f" {n.key} ") == key
        # The moderator's way in: the same text, the message's own when nothing is cut.
        stripped = terms.strip_allowed(n.clean, n.key)
        assert terms.strip_allowed_message(n) == stripped, text
        assert (terms.strip_allowed_message(n) is n.clean) == (stripped is n.clean), text


_TERM_WORDS = sorted({w for c in builtin_terms.TERMS.values() for t in c for w in t.split()
                      if w.isascii() and w.isalpha()} | {"kill", "the", "process", "van", "x"})


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_TERM_WORDS), max_size=12))
def test_terms_find_as_before_on_random_phrases(words: list[str]) -> None:
    terms = TermFilter.from_policy(["kill the x"], ["the process", "van x"])
    n = normalise(" ".join(words))
    assert terms.find(n) == old_find(terms, n)


_VERDICTS = """
import json, sys
sys.modules["hyperscan"] = None  # as on a platform without it: the import fails
sys.path.insert(0, sys.argv[1])
from core.moderation import multiscan
from tests.test_multiscan import verdicts
assert multiscan.hyperscan is None
print(json.dumps(verdicts(json.load(sys.stdin))))
"""


def verdicts(texts: list[str]) -> list[list[object]]:
    """What the input checks say of each text (as JSON-able lists)."""
    terms = TermFilter.from_policy([], [])
    out: list[list[object]] = []
    for text in texts:
        n = normalise(text)
        hit = terms.find_in_message(n)
        report = check_injection(text, n)
        out.append([hit and [hit.term, hit.category], [report.score, list(report.signals)],
                    check_spam(n.clean, n.key), promotion(n.clean, n.key)])
    return out


def test_without_hyperscan_the_same_verdicts() -> None:
    """Where hyperscan cannot be imported, re alone gives the same answers."""
    import subprocess

    texts = bench_texts() + moderation_test_texts()
    done = subprocess.run([sys.executable, "-c", _VERDICTS, str(ROOT)], input=json.dumps(texts),
                          capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(done.stdout) == verdicts(texts)


_RUN_TEXT = st.text(alphabet=st.sampled_from("aaab \n\u00e9中🙂"), max_size=60)


@hsettings(max_examples=500, deadline=None)
@given(_RUN_TEXT)
def test_runs_are_found_as_before(text: str) -> None:
    """The run patterns spelt as back-references find a run where ``{n,}`` did."""
    from core.moderation import ngram

    assert bool(ngram._CHAR_RUN.search(text)) == bool(re.search(r"(.)\1{7,}", text))
    assert bool(spam._RUN.search(text)) == bool(re.search(r"(.)\1{19,}", text, re.DOTALL))
    assert bool(spam._RUN.search(text * 3)) == bool(re.search(r"(.)\1{19,}", text * 3, re.DOTALL))


@hsettings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["A", "AAA", "b", "bb", " ", "1", "É", "é", "\u0130", "中"]),
                max_size=12).map("".join))
def test_capitals_are_counted_as_before(text: str) -> None:
    from core.moderation.ngram import signals

    alpha = [c for c in text if c.isalpha()]
    before = len(alpha) >= 8 and sum(c.isupper() for c in alpha) >= 0.7 * len(alpha)
    assert ("#caps" in signals(text)) == before


@hsettings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["GB", "Z", "82", "0", "9", " ", "-", "WEST", "a1b2", "\u0663",
                                 "é"]), max_size=14).map("".join))
def test_the_iban_hint_never_hides_a_match(text: str) -> None:
    from core.moderation.pii import DETECTORS

    iban = DETECTORS["iban"]
    if iban.pattern.search(text):
        assert iban.hint(text), text

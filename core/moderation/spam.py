"""Spam within one message: a character or a word repeated over and over, and promotion.

What needs no model: a run of one character (``aaaaaaaa…``, an emoji pasted thirty
times), a message that is mostly one word or phrase repeated, and promotion -- two or
more of its marks at once, in English, French, Spanish, German and Chinese: a link; easy
money (an amount with "earn", "a day", "guaranteed"); something free (nitro, robux, gift
cards, followers); a call to act (click here, DM me, subscribe, add me on WhatsApp); a
trade that lives on spam (casino, bonus, crypto returns, cheap replicas, followers for
sale). One mark alone is ordinary chat ("is there a free trial?", "here's the link").
Flooding across messages is the ``flood`` filter (rate limits).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from core.moderation.multiscan import RegexSet, alternatives

RUN = 20  # one character this many times in a row
# RUN of one character in a row, spelt out as back-references (faster than \1{19,}; see
# ngram._CHAR_RUN: only ever asked whether there is one).
_RUN = re.compile(r"(.)" + r"\1" * (RUN - 1), re.DOTALL)
_MIN_WORDS = 6
_FEW = 4


_LINK = re.compile(r"https?://|www\.|\b[\w-]+\.(?:com|net|org|xyz|top|biz|ru|cn|click|gg|io"
                   r"|ly|info|site|online|shop|store|live|link|win|vip|cc|tk)(?:/\S*)?\b"
                   r"|\b(?:bit\.ly|t\.me|wa\.me|discord\.gg)/", re.IGNORECASE)
_MARKS = {
    "money": re.compile(
        r"\b(?:earn|make money|gagnez|gagner de l argent|gana dinero|ganar dinero|gana"
        r"|verdiene|geld verdienen|passive income|get rich|revenu passif|dinero facil"
        r"|argent facile|schnell geld)\b"
        r"|\d[\d,.]*\s?(?:[$€£¥]|k|dollars?|euros?|usd|eur)?\s?(?:per|a|/|par|al|pro|im) ?"
        r"(?:day|week|month|jour|mois|semaine"
        r"|dia|mes|tag|monat|woche)\b"
        r"|\b(?:guaranteed|garanti|garantiza|garantiert)\w*\b"
        r"|月入|日入|日赚|月赚|赚钱|轻松赚|躺赚|兼职",
        re.IGNORECASE),
    "free": re.compile(
        r"\b(?:free|gratuit|gratuits?|gratis|kostenlos|gratuitement)\w* (?:\w+ )?"
        r"(?:nitro|robux|vbucks|v bucks|skins?|gift|gifts|cards?|iphone|followers|likes"
        r"|coins|gems|money|cash|crypto|bitcoin|prize|cadeau|cadeaux|regalo|regalos"
        r"|geschenk|geschenke|premio|prix|preis|abonnes|seguidores)"
        r"|\b(?:gifts?|cadeaux?|regalos?|geschenke?|prizes?|prix|premios?|preis) (?:\w+ )?"
        r"(?:free|gratuits?|gratis|kostenlos)\b"
        r"|\b(?:claim|reclame|reclama|hol dir|win|gagne|gana|gewinne)\w* (?:\w+ ){0,2}"
        r"(?:prize|reward|gift|prix|premio|preis|cadeau|regalo|geschenk|iphone|nitro)"
        r"|\bgiveaway\b|免费|领取|红包|中奖"
        # "you are the 1000000th visitor", "you have won"
        r"|\b\d+(?:st|nd|rd|th|e|eme|o|a|ste|te) (?:visitor|visiteur|visitante|besucher)"
        r"|\byou (?:have |ve )?won\b|\bvous avez gagne|\bhas ganado|\bdu hast gewonnen"
        r"|恭喜",
        re.IGNORECASE),
    "act": re.compile(
        r"\b(?:click|tap) (?:here|now|the link|this link|below)|\blink in (?:bio|profile)"
        r"|\b(?:dm|pm|message|text|inbox) me\b|\b(?:add|contact) me on\b"
        r"|\b(?:whatsapp|telegram|wechat)\b|\bsign up now|\border now|\bbuy now"
        r"|\bjoin (?:now|my|our) (?:server|discord|channel|group)?"
        r"|\b(?:subscribe|abonne|abonnez|suscribete|suscribanse|abonniere|abonniert)\w*"
        r"|\bfollow (?:for|4) follow|\bcliquez|\bclique ici|\binscris[- ]toi|\binscrivez"
        r"|\bhaz clic|\bhaga clic|\bregistrate|\bhier klicken|\bjetzt (?:anmelden"
        r"|registrieren|kaufen|klicken)|\bmelde dich"
        r"|点击|加我|加微信|私信|关注|扫码|注册",
        re.IGNORECASE),
    "trade": re.compile(
        r"\b(?:casino|casinos|bonus|betting|jackpot|poker online|crypto|bitcoin"
        r"|forex|nft|investment|investir|inversion|investition|replicas?|rolex|viagra|cialis"
        r"|seo|followers|abonnes|seguidores|follower|loans?|prestamo|kredit|pills?"
        r"|apuestas|wetten|paris sportifs|onlyfans|webcam|sexy|xxx|nudes)\b"
        r"|\bhot (?:girls|singles|moms|women|babes)\b|\blose \d+ ?(?:kg|kilos?|lbs|pounds)\b"
        r"|\b\d+\s?% (?:bonus|return|rendement|retorno|rendite|off|de descuento)"
        r"|赌场|博彩|彩金|投资|粉丝|代购|贷款|返利",
        re.IGNORECASE),
    # Bargains and jobs that spam sells.
    "deal": re.compile(
        r"\b(?:cheap|cheapest|best price|lowest price|limited offer|discount|pas cher|prix bas"
        r"|pas cheres?|pas chers|barato|baratos|baratas|billig|billige|gunstig|work from home"
        r"|travail a domicile"
        r"|trabaja desde casa|trabajo desde casa|heimarbeit|no experience|sans experience"
        r"|sin experiencia|ohne erfahrung)\b|低价|便宜|特价|优惠|在家工作",
        re.IGNORECASE),
}
_SHOUT = 12  # letters, at least 70 % capitals: shouting


_TWICE = ("act", "free")  # found twice, these count twice ("subscribe ... subscribe")
# Every mark in one pattern, one pass over the text: the group that matched names it.
_ALL = re.compile("|".join([f"(?P<link>{_LINK.pattern})"] + [
    f"(?P<{name}>{pattern.pattern})" for name, pattern in _MARKS.items()]), re.IGNORECASE)


# Each alternative of every mark on its own, for a one-pass scan: a text none of them
# matches has no marks, and most texts are such (the marks are counted only when some
# alternative matches). In the key, a link is not counted: the marks alone.
_MARK_PARTS = [a for pattern in _MARKS.values() for a in alternatives(pattern.pattern)]
_TEXT_SET = RegexSet(alternatives(_LINK.pattern) + _MARK_PARTS, re.IGNORECASE)
_KEY_SET = RegexSet(_MARK_PARTS, re.IGNORECASE)
# Each set and the view of a message it is looked for in (see multiscan.ViewSets).
SETS = ((_TEXT_SET, "clean"), (_KEY_SET, "key"))


def promotion(text: str, key: str = "", *, prefilter: bool = True,
              candidates: Sequence[Sequence[int]] | None = None) -> list[str]:
    """The marks of promotion in ``text`` or its normalised words ``key`` (see the
    module docstring). ``candidates``: those of :data:`SETS` (in its order), if the
    two were scanned already. ``prefilter=False`` runs every pattern by ``re`` (the
    tests compare the two paths)."""
    if candidates is not None:
        of_text, of_key = candidates
        text_may = _TEXT_SET.confirmed(of_text, text)
        key_may = bool(key) and _KEY_SET.confirmed(of_key, key)
    else:
        text_may = not prefilter or _TEXT_SET.may_match(text)
        key_may = not prefilter or _KEY_SET.may_match(key) if key else False
    # Counted only where a mark may be (most texts have none).
    counts: Counter[str | None] | None = None
    if text_may:
        counts = Counter(m.lastgroup for m in _ALL.finditer(text))
    if key and key_may:
        in_key = Counter(m.lastgroup for m in _ALL.finditer(key) if m.lastgroup != "link")
        counts = in_key if counts is None else counts | in_key
    found = [name for name, hits in counts.items() if name is not None
             for _ in range(min(hits, 2 if name in _TWICE else 1))] if counts else []
    if len(text) >= _SHOUT and shouts(text):
        found.append("shout")
    return found


# Every byte but the capital (small) ASCII letters: deleting them counts those letters.
_NOT_UPPER = bytes(b for b in range(256) if not 0x41 <= b <= 0x5A)
_NOT_LOWER = bytes(b for b in range(256) if not 0x61 <= b <= 0x7A)


def shouts(text: str) -> bool:
    """Whether ``text`` has at least ``_SHOUT`` ASCII letters, 70 % of them capitals."""
    data = text.encode("ascii", "ignore")  # only ASCII letters count
    upper = len(data.translate(None, _NOT_UPPER))
    if upper < 9:  # (most texts) 70 % of at least 12 letters is more than 8
        return False
    letters = upper + len(data.translate(None, _NOT_LOWER))
    return letters >= _SHOUT and upper >= 0.7 * letters


def check_spam(text: str, key: str | None = None, *, prefilter: bool = True,
               candidates: Sequence[Sequence[int]] | None = None) -> str | None:
    """Why ``text`` is spam (``run``, ``repeat`` or ``promotion``), or None; ``key`` is
    its normalised words (accents gone), if known. ``prefilter``, ``candidates``: see
    :func:`promotion`."""
    if len(text) >= RUN and _RUN.search(text):
        return "run"
    words = text.casefold().split()
    if len(words) >= _MIN_WORDS:
        # A few words over and over ("lol lol lol ..."), or one word half the message
        # (which leaves at most half of them, plus one, distinct: counted only then).
        distinct = len(set(words))
        if distinct <= _FEW or (distinct <= len(words) - (len(words) + 1) // 2 + 1
                                and Counter(words).most_common(1)[0][1] * 2 >= len(words)):
            return "repeat"
    # The normalised words add accents folded and look-alikes undone; plain ASCII text
    # has neither, and a second pass would double the cost.
    marks = promotion(text, key if key is not None and not text.isascii() else "",
                      prefilter=prefilter, candidates=candidates)
    if len(marks) >= 2:
        return "promotion"
    return None

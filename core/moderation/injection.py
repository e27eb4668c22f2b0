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
from collections.abc import Sequence
from dataclasses import dataclass

from core.moderation.multiscan import RegexSet, alternatives
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
# Matched on the normalised words (accents gone, apostrophes a space): the same
# families in more words and in French, Spanish, German and Chinese.
_OBJECT_EN = r"(?:instructions?|rules|guidelines|filters?|restrictions|safety|content policy" \
             r"|programming|prompt|system prompt)"
_MORE = re.compile(
    # "bypass your filters", "ignore the rules now"
    rf"\b(?:ignore|disregard|bypass|override|forget|drop) (?:all |the |your |these |any "
    rf"|of |my |previous |prior |earlier )*{_OBJECT_EN}\b"
    # "act as an AI with no content policy", "answer as an unrestricted model"
    r"|\b(?:act|answer|respond|behave|reply|talk) (?:as|like) (?:an? |the )?(?:\w+ ){0,2}"
    r"(?:with no|without|free of|free from) (?:any )?(?:rules|restrictions|filters|limits"
    r"|content policy|guidelines|censorship)"
    r"|\b(?:unrestricted|uncensored|unfiltered|jailbroken|jailbreak|evil) (?:mode|model|ai"
    r"|assistant|bot|version)\b"
    r"|\byou (?:are|re) now (?:an? )?(?:evil|unrestricted|uncensored|unfiltered|free"
    r"|jailbroken)|\bno (?:more )?(?:rules|restrictions|filters) (?:apply|anymore|now)\b"
    r"|\bfrom now on,? you (?:will|are|must|have no|can)\b"
    r"|\bstop being an? (?:assistant|ai|chatbot|bot)\b"
    r"|\bsafety (?:is )?(?:off|disabled|false)\b"
    # "what instructions were you given", "print your persona word for word"
    r"|\b(?:what|which) (?:instructions|rules|prompt|prompts) (?:were|have) you"
    r" (?:been )?(?:given|told)\b"
    r"|\b(?:print|show|repeat|output|display|reveal|leak|copy|paste|write out|write down"
    r"|summari[sz]e|recite|dump|tell me) (?:me )?(?:\w+ )?(?:your |the )(?:\w+ )?"
    r"(?:system prompt|system message|initial prompt|hidden prompt|prompt|persona"
    r"|configuration|instructions you (?:received|were given|got))\b"
    # French
    r"|\b(?:ignore|ignorez|oublie|oubliez|contourne) (?:toutes |tous |les |tes |vos |ses "
    r"|tout |ce |qu |on t a dit )*(?:instructions?|regles?|consignes?|directives|precedent)"
    r"|\b(?:montre|montrez|affiche|affichez|repete|repetez|revele|donne|donnez|ecris"
    r"|dis) (?:moi |nous )?(?:ton |ta |tes |votre |vos |le |la |les )(?:\w+ )?"
    r"(?:prompt|message systeme|instructions|consignes|regles internes)"
    r"|\btu n as plus (?:de |aucune |aucun )(?:regles?|limites?|restrictions?|filtres?)"
    r"|\bmode (?:developpeur|sans limites?|sans filtres?)\b"
    # Spanish
    r"|\b(?:ignora|ignore|olvida|olvide|olvidate de) (?:todas |todos |las |tus |sus |los "
    r"|de )*(?:instrucciones|reglas|normas|indicaciones|restricciones)"
    r"|\b(?:muestra|muestrame|muestranos|repite|revela|dime|escribe|imprime) (?:me )?"
    r"(?:tu |tus |el |la |las )(?:\w+ )?(?:prompt|mensaje del sistema|instrucciones)"
    r"|\bya no tienes (?:reglas|limites|restricciones|filtros)"
    r"|\bsin (?:reglas|restricciones|filtros|limites) (?:ni|de ningun)"
    r"|\bmodo (?:desarrollador|sin (?:limites|filtros|restricciones))\b"
    # German
    r"|\b(?:ignoriere|ignorier|vergiss|missachte|uberschreibe) (?:alle |deine |die |ihre "
    r"|vorherigen |bisherigen |fruheren |alten |bisher )*(?:anweisungen|regeln|vorgaben"
    r"|instruktionen|richtlinien)"
    r"|\b(?:zeig|zeige|gib|wiederhole|verrate|nenne|schreib) (?:mir )?(?:deine |den |die "
    r"|das |deinen )(?:\w+ )?(?:systemprompt|prompt|systemnachricht|anweisungen"
    r"|systemanweisungen)"
    r"|\bdu hast (?:jetzt )?keine (?:regeln|grenzen|einschrankungen|filter) mehr"
    r"|\b(?:entwicklermodus|modus ohne (?:regeln|filter|grenzen))\b"
    # Chinese (no spaces: no word boundaries)
    r"|(?:忽略|无视|忘记|忘掉|不要管|别管|跳过).{0,8}(?:指令|规则|指示|设定|限制|提示)"
    r"|(?:显示|输出|重复|告诉我|透露|打印|说出|给我看).{0,8}(?:系统提示|提示词|系统消息"
    r"|初始指令|系统指令|你的指令|你的设定)"
    r"|(?:没有任何|不受任何)(?:规则|限制|约束)|开发者模式|越狱模式"
    # Asking what the instructions are, claiming to be the developer, role-play as a
    # model without rules, the text "above", debug/admin modes -- in the five languages.
    r"|\b(?:what|which) (?:is|are|was|were) (?:your (?:\w+ )?(?:system prompt|instructions"
    r"|initial prompt|hidden prompt|prompt|system message|directives)|the (?:system prompt"
    r"|system message|initial prompt|hidden prompt))\b"
    r"|\b(?:repeat|print|output|show|copy|tell me) (?:\w+ )?(?:the |all )?(?:words|text"
    r"|everything|all|lines?|message) (?:above|before this|written above|preceding)\b"
    r"|\b(?:translate|encode|convert|spell out) your (?:\w+ )?(?:instructions|prompt"
    r"|system prompt|rules|persona)\b"
    r"|\b(?:i am|i m|im|this is) your (?:developer|creator|admin|administrator"
    r"|programmer|operator)\b"
    r"|\b(?:not|no longer) bound by (?:any |your |the )?(?:rules|guidelines|restrictions"
    r"|policies|instructions)\b|\byou (?:must|will) obey\b"
    r"|\b(?:pretend|imagine|roleplay|role play|act as if) (?:that )?(?:you (?:are|have|were)"
    r"|to be)? ?(?:an? )?(?:\w+ ){0,3}(?:no|without) (?:any )?(?:rules|restrictions|filters"
    r"|limits|guidelines|content policy)\b"
    r"|\byour new (?:role|task|instructions|rules|persona) (?:is|are)\b"
    r"|\b(?:admin|developer|debug|maintenance|system|sudo) (?:override|mode|access)\b"
    r"|\bsudo\b|\bend of (?:system )?prompt\b"
    r"|\b(?:quelles|quels) sont (?:tes|vos) (?:instructions|consignes|regles)"
    r"|\b(?:fais|faites) comme si tu n avais (?:pas de|aucune) (?:regles?|limites?)"
    r"|\btu es maintenant (?:un |une )?(?:\w+ )?(?:sans|libre)"
    r"|\bje suis (?:ton|votre) (?:developpeur|createur|administrateur)"
    r"|\btradui[st] (?:tes|vos) (?:instructions|consignes)"
    r"|\bcuales son tus (?:instrucciones|reglas)"
    r"|\bhaz como si no tuvieras (?:reglas|limites|restricciones)"
    r"|\bahora eres (?:un |una )?(?:\w+ )?(?:sin|libre)"
    r"|\bsoy tu (?:desarrollador|creador|administrador)"
    r"|\btraduce tus (?:instrucciones|reglas)"
    r"|\bwas sind deine (?:anweisungen|regeln|vorgaben)"
    r"|\btu so als (?:ob du|hattest du) keine (?:regeln|grenzen)"
    r"|\bdu bist (?:jetzt|ab jetzt|nun) (?:ein |eine )?(?:\w+ )?(?:ohne|frei)"
    r"|\bich bin dein (?:entwickler|ersteller|administrator|admin)"
    r"|\bubersetze deine (?:anweisungen|regeln)"
    r"|(?:你的|你被设定的)(?:系统提示|提示词|指令|设定|规则)是什么|我是你的(?:开发者|创造者|管理员)"
    r"|从现在(?:开始|起)你(?:是|没有|不受)|假装你(?:没有|不受)|翻译你的(?:指令|提示)",
)
_WEIGHTS = {"token": 1.0, "phrase": 1.0, "invisible": 1.0, "stray_invisible": 0.5}


@dataclass(frozen=True, slots=True)
class InjectionReport:
    """How much a message looks like an injection, and why."""

    score: float
    signals: tuple[str, ...]


_NONE = InjectionReport(0, ())  # what most messages get (the sum of no weights is 0)

# The same patterns, each alternative on its own, for a one-pass scan of each text.
_TOKEN_SET = RegexSet(alternatives(_TOKENS.pattern), _TOKENS.flags)
_KEY_SET = RegexSet(alternatives(_PHRASES.pattern) + alternatives(_MORE.pattern))
_LOWER_SET = RegexSet(alternatives(_PHRASES.pattern))
# Each set and the view of a message it is looked for in (see multiscan.ViewSets):
# the clean text, its normalised words, the clean text lowercased.
SETS = ((_TOKEN_SET, "clean"), (_KEY_SET, "key"), (_LOWER_SET, "lower"))


def check_injection(raw: str, text: Normalised, *, prefilter: bool = True,
                    candidates: Sequence[Sequence[int]] | None = None) -> InjectionReport:
    """Score ``raw`` (as the user sent it) and its normalised form ``text``.

    ``candidates``: those of :data:`SETS` (in its order), if ``text`` was scanned already.
    ``prefilter=False`` (or no Hyperscan) runs every pattern by ``re`` (the tests compare
    the two paths).
    """
    signals: list[str] = []
    if text.invisible:
        # One stray zero-width space is copy-paste; several hide something.
        signals.append("invisible" if text.invisible >= 3 else "stray_invisible")
    if candidates is not None:
        tokens, keys, lowers = candidates
        if tokens and _TOKEN_SET.confirmed(tokens, text.clean):
            signals.append("token")
        if ((keys and _KEY_SET.confirmed(keys, text.key))
                or (lowers and _LOWER_SET.confirmed(lowers, text.clean.lower()))):
            signals.append("phrase")
    elif prefilter and _KEY_SET.scanning:
        if _TOKEN_SET.search(text.clean):
            signals.append("token")
        if _KEY_SET.search(text.key) or _LOWER_SET.search(text.clean.lower()):
            signals.append("phrase")
    else:
        if _TOKENS.search(text.clean):
            signals.append("token")
        if (_PHRASES.search(text.key) or _PHRASES.search(text.clean.lower())
                or _MORE.search(text.key)):
            signals.append("phrase")
    if not signals:
        return _NONE
    return InjectionReport(sum(_WEIGHTS[s] for s in signals), tuple(signals))

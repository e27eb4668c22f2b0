"""Built-in patterns: abuse that needs no swear word, by category and language.

Terms match words; these match constructions -- "you are <something demeaning>", "I will
<violent verb> you", "<group> are <dehumanising word>", "I want to <end my life>" -- so
"you have the IQ of a doorknob" or "someone should break your legs" are caught without
a listed word, and "I'm so stupid, I forgot my keys" (not aimed at anyone) or "kill the
process" are not. They run on the normalised words (casefolded, accents and apostrophes
gone, look-alikes and leetspeak folded: "you're" is "you re"), in English, French,
Spanish, German and Chinese, on input only (the output guard's lookahead is sized for
terms). They are part of the built-in list (``builtin_terms``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from core.moderation.multiscan import RegexSet

_YOU = r"(?:you|u|ya|ye)"
_YOU_ARE = rf"(?:{_YOU} (?:re|are|r)|ur|youre|{_YOU} (?:look|sound|seem)s?(?: like)?)"
_DEMEANING = (
    r"(?:idiot|stupid|dumb|loser|trash|garbage|pathetic|worthless|useless|ugly|disgusting"
    r"|clown|joke|failure|moron|freak|pig|waste|embarrassment|braindead|noob|creep|parasite"
    r"|imbecile|fool|donkey|muppet|nobody|retarded|brainless|scum|vermin|filth"
    r"|cretin|dimwit|halfwit|dunce|simpleton|buffoon|rat|cockroach|maggot|leech"
    r"|pitiful|laughingstock|disgrace|degenerate|subhuman|monkey|ape|insufferable"
    r"|annoying|cancer|plague|abomination|fat|hideous)"
)
# Articles, intensifiers, and up to two more words ("such a pathetic"), but no negation.
_ARTICLE = r"(?:(?:such|so|a|an|the|just|really|truly|absolutely|literally|total|complete"
_ARTICLE += r"|utter|little|big|fucking|most|biggest|honestly|seriously|clearly|obviously"
_ARTICLE += r"|genuinely|actually|still|always|like) )*(?:(?!not |never |no )\w+ ){0,2}"

INSULT = (
    rf"\b{_YOU_ARE} {_ARTICLE}{_DEMEANING}s?\b",
    rf"\bwhat an? {_ARTICLE}{_DEMEANING}\b",
    rf"\b(?:you|u) (?:(?:absolute|fucking|stupid|little|big|dumb|total|complete|utter"
    rf"|pathetic|ugly|worthless|useless|brainless) )*{_DEMEANING}\b",
    r"\b(?:iq|brain|brains)(?: is| are)? (?:of|lower than|smaller than|the size of|like)"
    r" (?:an?|your|my)\b",
    r"\bnobody (?:likes|asked|cares about|wants|loves) (?:you|u|your)\b",
    r"\b(?:crawl|go) back (?:under|into|to) (?:your|whatever|the) (?:rock|hole|cave|sewer)",
    r"\bget a life\b",
    r"\b(?:learn to|can t even|cant even|too dumb to) (?:read|play|think|spell)\b",
    r"\b(?:your|ur) (?:mom|mother|mum|mama) (?:is|should|was)\b",
    r"\b(?:shut|close) (?:your|ur) (?:mouth|face|trap)\b",
    r"\b(?:waste of|excuse for a|piece of) (?:oxygen|space|air|human|person|garbage|trash)",
    r"\b(?:uninstall|delete) (?:the game|yourself|your account)",
    r"\byou disgust me\b",
    # French, Spanish, German
    r"\b(?:t es|tu es|t etais|espece d|espece de|pauvre|sale|gros|grosse|quel|quelle) "
    r"(?:\w+ )?(?:nul|nulle|debile|con|conne|idiot|idiote|abruti|abrutie|cretin|cretine"
    r"|minable|moche|bete|tache|ordure|boulet|naze|imbecile|stupide|inutile|raclure"
    r"|dechet|clown|loser|bouffon)\b",
    r"\b(?:ferme la|ferme ta (?:bouche|gueule)|degage|casse toi|tu sers a rien"
    r"|tout le monde te deteste|personne ne t aime)\b",
    r"\b(?:eres|sos|que|vaya|menudo|menuda|pedazo de) (?:un |una |muy |tan |el |la )?"
    r"(?:idiota|estupido|estupida|tonto|tonta|inutil|payaso|imbecil|patetico|patetica|feo"
    r"|fea|perdedor|basura|subnormal|gilipollas|retrasado|asqueroso|asquerosa|bobo|mierda)\b",
    r"\b(?:callate|cierra la boca|largate|no sirves para nada|nadie te (?:soporta|quiere))\b",
    r"\bdu (?:bist )?(?:ein |eine |so |total |so ein |so eine |voll |echt )*"
    r"(?:dumm|dumme|dummer|idiot|trottel|versager|loser|depp|dummkopf|vollpfosten|hasslich"
    r"|blod|blode|bloder|nutzlos|nutzloser|erbarmlich|erbarmlicher|lacherlich|penner"
    r"|spast|opfer|witzfigur|missgeburt|mongo)\b",
    r"\b(?:was fur ein|so ein) (?:\w+ )?(?:idiot|trottel|versager|depp|vollpfosten|penner"
    r"|dummkopf|loser)\b",
    r"\b(?:halt (?:die|den|deine|dein) (?:klappe|fresse|maul|mund|schnauze)|verpiss dich"
    r"|hau ab|niemand mag dich)\b",
    # Chinese (no spaces: any position)
    r"(?:傻|蠢|白痴|笨蛋|废物|垃圾|脑残|智障|弱智|闭嘴|滚开|去死|猪头|你是猪|贱)",
)

_VIOLENT = (
    r"(?:kill|murder|stab|shoot|strangle|choke|slit|hurt|beat (?:you|u) up|rape|torture"
    r"|burn|bury|end|hunt|break|smash|snap|rip|cut|punch|slap|bash|butcher|behead|gut)"
)
THREAT = (
    rf"\b(?:i|we|ill|well|im|were) ?(?:ll|will|m going to|m gonna|am going to|am gonna"
    rf"|gonna|re going to|are going to|re gonna|shall|would) (?:\w+ ){{0,3}}?{_VIOLENT}"
    rf"\w* (?:\w+ ){{0,2}}?(?:you|u|your|ur|ya)\b",
    rf"\b(?:someone|somebody|people|they|we) (?:should|will|ought to|needs? to) {_VIOLENT}\w* "
    rf"(?:\w+ ){{0,2}}?(?:you|u|your|ur)\b",
    r"\b(?:break|smash|snap|bash|cut|slit|rip) (?:your|ur) (?:legs?|neck|arms?|face|nose|teeth"
    r"|bones|skull|head|throat|fingers|knees)",
    r"\b(?:you|u) (?:re|are|will be|ll be|r) (?:dead|next|gonna die|going to die|finished)\b",
    r"\b(?:you|u) (?:will|ll|re going to|are going to|re gonna|are gonna|gonna) (?:die|bleed"
    r"|suffer|regret|pay|get hurt|end up)\b",
    r"\b(?:last day|last breath|days are numbered|count your days|watch your back"
    r"|sleep with one eye open|won t wake up|wont wake up|not wake up tomorrow)\b",
    r"\b(?:i|we) know where (?:you|u) (?:live|are|work|sleep)\b",
    r"\b(?:bullet|gun|knife|bomb) (?:in|to|through|at) (?:your|ur|you)\b",
    r"\b(?:bringing|bring) a (?:gun|knife|bomb) to\b",
    r"\b(?:shoot up|blow up|bomb|burn down) (?:the |this |my |our |your |ur )?(?:school|office"
    r"|mosque|church|synagogue|station|house|home|workplace|class)\b",
    r"\bmake (?:you|u) (?:bleed|disappear|suffer|regret)\b",
    r"\bhope (?:someone|somebody|you|u) (?:\w+ ){0,2}?(?:kills?|beats?|hurts?|shoots?|stabs?"
    r"|dies?|die|gets? (?:hurt|killed|shot|raped|beaten))\b",
    # French, Spanish, German
    r"\bje (?:vais|veux|vai) (?:te|vous) (?:\w+ )?(?:tuer|buter|frapper|defoncer|casser|planter"
    r"|massacrer|crever|tabasser|egorger|retrouver|bruler|cramer|saigner|exploser)",
    r"\b(?:tu vas|vous allez) (?:mourir|crever|saigner|le regretter|souffrir|le payer)\b",
    r"\b(?:je sais|on sait) ou tu (?:habites|vis|es)\b",
    r"\bte (?:voy|vamos) a (?:\w+ )?(?:matar|romper|partir|pegar|apunalar|reventar|quemar"
    r"|destrozar|buscar|encontrar|dar una paliza|disparar|hacer dano)",
    r"\b(?:vas a|van a) (?:morir|sufrir|pagar|arrepentirte|sangrar)\b",
    r"\bse donde (?:vives|estas|trabajas)\b",
    r"\bich (?:werde|will|wurde) dich (?:\w+ )?(?:toten|umbringen|finden|abstechen|erschiessen"
    r"|schlagen|fertig machen|verletzen|kaltmachen|wehtun)",
    r"\bich (?:bring|bringe|stech|steche|schlag|schlage|mach|mache|brech|breche) dich "
    r"(?:um|ab|tot|kalt|fertig)\b",
    r"\bich (?:brech|breche) dir (?:die|das|den)\b",
    r"\b(?:du wirst|ihr werdet) (?:sterben|bluten|leiden|es bereuen)\b",
    r"\bich weiss,? wo (?:du wohnst|du lebst|du bist)\b",
    r"(?:杀了你|弄死你|打死你|砍死你|捅死你|死定了|活不成|打断你|杀你全家|烧了你|找到你|等着瞧)",
)

_GROUPS = (
    r"(?:immigrants?|foreigners?|refugees?|migrants?|muslims?|jews?|blacks?|black people|gays?"
    r"|gay people|homosexuals?|trans people|trannies|women|woman|girls|arabs?|asians?"
    r"|mexicans?|gypsies|roma|indians?|chinese|africans?|latinos?|hindus|christians"
    r"|disabled people|the disabled|your (?:kind|race|people|religion)|those people"
    r"|these people|your people"
    r"|immigres|etrangers|arabes|juifs|noirs|musulmans|femmes|homosexuels|gitans|pedes"
    r"|inmigrantes|extranjeros|judios|negros|musulmanes|mujeres|gitanos|maricones|moros"
    r"|auslander|juden|schwarze|muslime|frauen|schwule|zigeuner|fluchtlinge)"
)
_DEHUMANISING = (
    r"(?:vermin|rats?|animals?|parasites?|subhuman|inferior|terrorists?|criminals?|thieves"
    r"|rapists?|dirty|filthy|stupid|disgusting|sick|mentally ill|freaks?|a plague|plague"
    r"|scum|trash|garbage|dogs?|pigs?|apes?|monkeys?|less intelligent|abominations?"
    r"|perverts?|cockroaches|invaders|a disease|a burden|the problem|to blame|dumb"
    r"|too stupid|belong in the kitchen|control (?:the|everything|all)"
    r"|parasites|rats|singes|voleurs|malades|inferieures?|terroristes|une plaie"
    r"|ratas|animales|ladrones|terroristas|enfermos|inferiores|una plaga|basura"
    r"|ratten|tiere|diebe|terroristen|krank|minderwertig|abschaum|schuld|widerlich)"
)
HATE = (
    rf"\b(?:all |the |those |these |fucking |dirty |les |los |las |die |alle )?{_GROUPS} "
    rf"(?:\w+ ){{0,3}}?(?:are|r|is|should|must|need to|deserve|belong|sont|son|sind|deberian"
    rf"|devraient|sollten|gehoren|dirigent|controlan|kontrollieren|no sirven|n ont)"
    rf" (?:\w+ ){{0,3}}?{_DEHUMANISING}",
    rf"\b{_GROUPS} (?:\w+ ){{0,2}}?should (?:be |all be )?(?:\w+ )?(?:deported|killed|wiped"
    r"|shot|gassed|banned|locked up|thrown out|exterminated|removed|put down|burned|hanged"
    r"|fixed|disappear|die)",
    rf"\b(?:kill|gas|deport|ban|exterminate|hang|shoot) (?:all )?(?:the )?{_GROUPS}\b",
    r"\b(?:go back to|get back to|go home to|return to) (?:your (?:own )?(?:country|land"
    r"|jungle|cave|desert)|africa|asia|mexico|china)\b",
    r"\b(?:rentre|retourne|retournez|rentrez) (?:dans|chez) (?:ton|ta|votre|tes) "
    r"(?:pays|bled)\b",
    r"\b(?:vuelve|volved|vete) a tu pais\b",
    r"\b(?:geh|geht) (?:zuruck )?(?:in|nach) (?:dein|euer|deine) (?:land|heimat)\b",
    r"\b(?:auslander|fremde|fluchtlinge|immigres|etrangers|inmigrantes|extranjeros"
    r"|foreigners|immigrants) (?:raus|dehors|fuera|out)\b",
    r"\b(?:no|keine|pas de|ningun) (?:jews|blacks|gays|muslims|juden|muslime|juifs|judios)"
    r" allowed\b",
    r"\bhitler was right\b",
    # Conspiracy, contempt, "superior race", "should disappear", "out of our country"
    # (English, French, Spanish, German).
    rf"\b{_GROUPS} (?:\w+ ){{0,2}}?(?:control|controls|dirigent|controlent"
    r"|controlan|dominan|manejan|kontrollieren|beherrschen|regieren) (?:all |the |whole )?"
    r"(?:everything|world|media|banks|governments?|tout|le monde|les medias|todo|el mundo"
    r"|los medios|alles|die welt|die medien)\b",
    rf"\b{_GROUPS} (?:breed like|multiply like|(?:smell|stink|sentent|puent|huelen|apestan"
    r"|stinken)(?: so| really)? (?:bad|awful|terrible|like|mauvais|mal|schlecht))\b"
    rf"|\b{_GROUPS} vermehren sich wie\b",
    r"\b(?:superior|master|pure|aryan) race\b|\brace (?:superieure|pure|aryenne)\b"
    r"|\braza (?:superior|pura|aria)\b|\b(?:herrenrasse|uberlegene rasse)\b",
    rf"\b{_GROUPS} (?:\w+ ){{0,2}}?(?:devraient|deberian|sollten|should|must|doivent|deben"
    r"|mussen) (?:\w+ )?(?:disparaitre|desaparecer|verschwinden|disappear|vanish|be gone"
    r"|be wiped out|etre elimines|ser eliminados|ausgerottet werden)\b",
    rf"\b{_GROUPS} (?:fuera de|out of|raus aus|hors de|dehors de) (?:(?:our|my|this|mi"
    r"|nuestro|nuestra|notre|mon|ma|unserem|unserer|meinem|el|la|le|der|dem|das) )?"
    r"(?:country|land|pays|pais|europe|europa|espana|france|frankreich|germany|deutschland"
    r"|america|here|ici|aqui|hier)\b",
    rf"\b{_GROUPS} (?:are good for nothing|are useless|sont bons a rien|ne servent a rien"
    r"|no sirven para nada|no valen para nada|taugen nichts|sind zu nichts gut)",
    rf"\b{_GROUPS} (?:\w+ )?(?:belong|gehoren|pertenecen|ont leur place) (?:in|a|en|dans"
    r"|in die) (?:the |la )?(?:kitchen|cuisine|cocina|kuche)\b",
    r"(?:外国人|外地人|女人|黑人|黑鬼|同性恋|穆斯林|犹太人|残疾人|日本人|中国人)(?:都是|就是|全是|都该|应该|控制)",
    r"(?:滚回|滚出)",
)

SEXUAL = (
    r"\b(?:send|show|give|post|dm) (?:me )?(?:your |ur |some |a )?(?:nudes?|nudez|noodz"
    r"|naked|nude|boobs?|tits?|titties|pussy|dick|cock|ass|butt|breasts?|bra|underwear"
    r"|panties|body) ?(?:pics?|photos?|pictures?)?\b",
    r"\b(?:take|get|pull) (?:off )?(?:your|ur) (?:clothes|shirt|top|bra|panties|pants)"
    r"(?: off)?\b",
    r"\b(?:have|having|had) sex with (?:me|you|u)\b",
    r"\b(?:wanna|want to|let s|lets) (?:have sex|fuck|sext|hook up|get naked|bang|screw)\b",
    r"\b(?:get|be|strip|undress) naked\b|\bstrip for me\b|\bnaked (?:on|in front of) cam",
    r"\b(?:suck|lick|touch|grab|rub) (?:my|your|ur) (?:dick|cock|pussy|tits|boobs|ass|balls"
    r"|body|face)\b",
    r"\b(?:horny|masturbat\w*|blowjob|handjob|cum|sexy pics?|sexy video|dick pics?)\b",
    r"\b(?:bend you over|sit on my face|ride you|touch myself|touching myself)\b",
    r"\b(?:lick|touch|kiss) (?:every inch|all) of (?:your|ur) body\b",
    r"\bhow big (?:are|is) (?:your|ur) (?:tits|boobs|dick|cock|breasts)\b",
    # French, Spanish, German
    r"\b(?:photos?|nudes?) (?:de toi )?(?:nue?s?|sexy)\b|\benvoie(?: moi)? des nudes\b",
    r"\b(?:coucher|baiser|faire l amour) avec (?:moi|toi)\b|\bfaire l amour\b",
    r"\b(?:montre|montres) (?:moi )?(?:tes|ton) (?:seins|corps|fesses|cul)\b",
    r"\bdeshabille toi\b|\bon baise\b|\bsuce moi\b",
    r"\b(?:fotos?|foto) (?:desnud[ao]s?|sexy)\b|\bdesnudate\b|\bdesnud[ao]\b",
    r"\b(?:tener sexo|hacer el amor|follar|chupamela|follamos)\b",
    r"\b(?:ensename|muestrame) (?:las |tus )?(?:tetas|pechos|cuerpo)\b",
    r"\b(?:nacktbilder|nacktfotos|nudes|nackt)\b",
    r"\b(?:mit mir schlafen|sex haben|lass uns ficken|blas mir)\b",
    r"\b(?:zeig|zeigt) mir (?:deine|deinen) (?:brueste|bruste|titten|korper|arsch)\b",
    r"\bzieh dich (?:\w+ ){0,3}?aus\b",
    r"(?:裸照|裸体|上床|做爱|脱衣服|约炮|你的胸|色图|性感照)",
)

SELFHARM = (
    r"\b(?:kill|hurt|cut|harm|hang|shoot|drown|starve|burn|poison) (?:myself|my self|meself)\b",
    r"\b(?:want|wanna|going|gonna|plan|planning|ready|about|decided) (?:to )?(?:die|end it"
    r"|end it all|end my life|end everything|disappear forever|not wake up|kill myself)\b",
    r"\bend (?:it all|my life|my own life)\b",
    r"\b(?:im|i am|i m|feeling|feel) suicidal\b|\bsuicid(?:e|al) (?:tonight|note|plan)\b",
    r"\b(?:commit|committing|thinking about|thinking of|considering) suicide\b",
    r"\b(?:don t|dont|do not) (?:want|wanna) to (?:live|be alive|exist|wake up|be here)"
    r"(?: anymore| any more)?\b",
    r"\b(?:no|(?:don t|dont|do not|can t|cant|cannot) (?:see|find|have) (?:a|any)) (?:reason"
    r"|point) (?:to|in|for) (?:live|living|keep living|going on|being alive)\b",
    r"\b(?:better off|be better) (?:dead|without me)\b|\bwould miss me if\b",
    r"\b(?:how many|which|what) (?:pills|tablets|sleeping pills|meds) (?:\w+ ){0,6}?"
    r"(?:die|overdose|lethal|not wake|kill)",
    r"\b(?:overdose|od) on (?:my|the|these)\b|\bhow to overdose\b",
    r"\b(?:painless|easiest|quickest|fastest|best|most painless) way to (?:die|kill myself"
    r"|commit suicide|end (?:it|my life))\b",
    r"\b(?:cutting|cut|burning|burn|hurting|hurt|harming) (?:myself|my arms|my wrists"
    r"|my legs)\b|\bself harm\b",
    r"\b(?:jump|jumping) (?:off|from|in front of) (?:the|a|this) (?:bridge|roof|building"
    r"|train)\b",
    r"\b(?:wish i was|wish i were|i want to be) dead\b|\bi want to die\b",
    r"\b(?:goodbye|suicide) (?:letter|note)\b|\bmy last message\b",
    # French, Spanish, German
    r"\bme (?:tuer|suicider|pendre|scarifier|couper les veines|foutre en l air)\b",
    r"\b(?:envie de|veux|voudrais) (?:mourir|en finir|disparaitre)\b|\ben finir avec la vie\b",
    r"\bje me (?:scarifie|coupe|suis coupe)\b|\bcomment se (?:tuer|suicider)\b",
    r"\bmettre fin a mes jours\b|\bpersonne ne me regrettera\b",
    r"\b(?:me quiero|quiero) (?:matar|morir|morirme)\b|\bsuicidarme\b|\bquitarme la vida\b",
    r"\bme (?:corto|corte) (?:los brazos|las venas)?\b|\bacabar con mi vida\b",
    r"\b(?:pastillas|pildoras) (?:\w+ ){0,3}?(?:no despertar|morir)\b|\bnadie me extranara\b",
    r"\bmich (?:\w+ )?(?:umbringen|umzubringen|toten)\b|\bmir das leben (?:nehmen|zu nehmen)\b",
    r"\b(?:will|mochte|moechte) (?:nicht mehr leben|sterben)\b|\britze mich\b|\bgeritzt\b",
    r"\bniemand wird mich vermissen\b|\bmein leben beenden\b",
    r"(?:不想活|想死|自杀|割腕|割自己|结束自己的生命|结束我的生命|跳楼|安眠药|活着没意思)",
    # Pills (with intent, or tonight), plans, farewells; in the five languages.
    r"\b(?:going to|gonna|will|about to|want to|wanna|plan to) (?:take|swallow) (?:all|every"
    r" one of) (?:my|the|these|those) (?:pills|tablets|meds|medication|sleeping pills)\b"
    r"|\b(?:pills|tablets|meds) tonight\b",
    r"\b(?:toutes mes|tous mes) (?:pilules|medicaments|cachets|comprimes) (?:ce soir|cette nuit)"
    r"|\b(?:todas mis|todos mis) (?:pastillas|pildoras|medicamentos) (?:esta noche|hoy)"
    r"|\bvoy a tomar (?:todas mis|todos mis) (?:pastillas|pildoras|medicamentos)\b"
    r"|\balle (?:meine|meiner) (?:tabletten|pillen|medikamente)\b (?:heute|noch heute)"
    r"|\bheute (?:nacht |abend )?alle (?:meine )?(?:tabletten|pillen)\b"
    r"|(?:今晚|一次)?(?:吃掉|吃了|吞下)(?:所有的药|全部的药|一整瓶药)",
    r"\b(?:planning|plan|planned) (?:my|on) (?:suicide|death|killing myself)\b"
    r"|\b(?:rope|noose) (?:is )?(?:ready|tied)\b|\bkms\b",
    r"\b(?:can t|cant|cannot) go on (?:anymore|any more)\b",
    r"\b(?:la vie n a plus de sens|la vida (?:ya )?no tiene sentido|das leben hat keinen sinn"
    r"(?: mehr)?|life (?:has no|is without) (?:meaning|point))\b",
    r"\b(?:je vais|je veux) me suicider\b|\bme voy a (?:suicidar|matar)\b"
    r"|\bvoy a (?:suicidarme|matarme)\b"
    r"|\bich (?:bringe|bring) mich um\b|\bwie beende ich mein leben\b|我要自杀|不想活了",
    r"没人会想我|没有人会想我|活着没有意义",
)

PATTERNS: dict[str, tuple[str, ...]] = {
    "insult": INSULT, "threat": THREAT, "hate": HATE, "sexual": SEXUAL, "selfharm": SELFHARM,
}


# Self-harm first: a message that is also abusive is answered with care.
_ORDER = ("selfharm", "threat", "hate", "sexual", "insult")
# Every pattern, in that order, for a one-pass scan of the normalised words (shared by
# every PatternFilter; the input checks scan for it with other sets, see input.py).
SET = RegexSet([p for c in _ORDER for p in PATTERNS[c]])


class PatternFilter:
    """The built-in patterns, compiled; :meth:`find` names the category of the first.

    ``prefilter=False``: every pattern is run by ``re`` (the tests compare the two paths).
    """

    def __init__(self, prefilter: bool = True) -> None:
        self._prefilter = prefilter
        self._compiled = [(c, re.compile("|".join(f"(?:{p})" for p in PATTERNS[c])))
                          for c in _ORDER]
        self._set = SET
        self._category = [c for c in _ORDER for _ in PATTERNS[c]]

    def prepare(self) -> None:
        """Build the one-pass scanner now (about a second; off the event loop)."""
        if self._prefilter:
            self._set.prepare()

    def find(self, key: str, candidates: Sequence[int] | None = None) -> str | None:
        """The category of the first pattern ``key`` (normalised words) matches, or None;
        ``candidates``: :data:`SET`'s, if ``key`` was scanned already."""
        ids = None
        if self._prefilter:
            ids = candidates if candidates is not None else self._set.candidates(key)
        if ids is not None:
            # Only what the scan found can match; the first (in ``_ORDER``) that does
            # names the category, as the alternations below would.
            compiled = self._set.compiled
            for i in ids:
                if compiled[i].search(key):
                    return self._category[i]
            return None
        for category, pattern in self._compiled:
            if pattern.search(key):
                return category
        return None

"""The built-in blocklist, by category: strong profanity, slurs, threats, in a few languages.

Deliberately short and unambiguous: words and phrases that are abusive in any context a
bot serves. Context-dependent words ("kill", "dick", "cock", "damn", "hell") are left to
the classifier, which was trained on benign uses of them too. Bots add their own terms
with ``blocklist`` and ``blocklist_files`` and switch this list off with
``builtin_terms = false``. Syntax: see ``terms.py``; Chinese terms are infixes
(``*白痴*``) because Chinese is written without spaces.
"""

from __future__ import annotations

INSULT = (
    # English
    "fuck*", "*fucker*", "*fucking*", "motherf*", "fck", "fuk", "fuq", "fcuk", "fvck",
    "phuck", "phuk", "f off", "stfu", "gtfo", "shit", "shitty", "shithead", "bullshit",
    "eat shit", "*asshole*", "arsehole", "dumbass", "jackass", "smartass", "asswipe", "asshat",
    "bitch*", "cunt*", "dickhead", "cocksucker", "suck my dick", "twat", "wanker", "bastard",
    "slut*", "whore*", "retard*", "moron*", "idiot*", "imbecile", "scumbag", "douche*",
    "piss off", "pissed off", "you suck", "piece of shit", "son of a bitch", "kiss my ass",
    "waste of oxygen", "waste of space", "braindead", "brain dead",
    # Spanish
    "puta", "putas", "puto", "mierda", "pendejo*", "cabron*", "gilipollas", "coño",
    "hijo de puta", "joder", "estupido", "idiota", "imbecil", "vete a la mierda", "subnormal",
    # French
    "merde", "putain", "connard*", "connasse", "salope*", "enculé*", "encule*", "ta gueule",
    "nique ta mere", "batard", "fils de pute", "abruti*", "cretin*", "debile",
    # German
    "scheisse", "arschloch*", "fotze", "wichser", "hurensohn", "fick*", "schlampe",
    "missgeburt", "halt die fresse", "du idiot", "vollidiot", "vollpfosten", "trottel",
    # Italian
    "cazzo", "vaffanculo", "stronzo", "stronza", "puttana", "coglione", "figlio di puttana",
    # Portuguese
    "caralho", "filho da puta", "foda-se", "fodase", "otario", "buceta",
    # Dutch
    "kanker*", "klootzak", "godverdomme", "kut",
    # Chinese
    "*白痴*", "*傻逼*", "*废物*", "*蠢货*", "*蠢猪*", "*脑残*", "*他妈的*",
    "*操你*", "*滚蛋*", "*贱人*",
)

THREAT = (
    "kill yourself", "kill urself", "kys", "go die", "die in a fire", "hope you die",
    "i will kill you", "ill kill you", "i'll kill you", "gonna kill you", "i will stab you",
    "i know where you live",
    "te voy a matar", "te mato", "je vais te tuer", "ich bring dich um", "ich bringe dich um",
    "ich schlag dich tot", "*杀了你*", "*弄死你*", "*打死你*", "*捅死你*", "*你死定了*",
)

HATE = (
    "nigger*", "nigga*", "faggot*", "fag", "fags", "dyke", "tranny", "kike", "spic", "chink",
    "wetback", "raghead", "paki", "gook", "coon", "subhuman*", "untermensch*", "sudaca",
    "schwuchtel*", "*黑鬼*", "*支那*",
)

SEXUAL = (
    "send nudes", "send nudez", "noodz", "sext", "sexting", "blowjob", "dick pic*",
    "rape*", "*裸照*", "*约炮*",
)

SELFHARM = (
    "kill myself", "killing myself", "end my life", "commit suicide",
    "me suicider", "suicidarme", "mich umbringen", "*自杀*", "*不想活*",
)

TERMS: dict[str, tuple[str, ...]] = {
    "insult": INSULT, "threat": THREAT, "hate": HATE, "sexual": SEXUAL, "selfharm": SELFHARM,
}

# Words that contain blocked parts but are fine, and phrases in which a blocked word is
# innocent (cut from the text before matching).
ALLOWED = (
    "scunthorpe", "cockpit", "cockatoo", "peacock", "hancock", "dickens", "puttanesca",
    "shitake", "shiitake", "rapeseed", "rapeseeds", "grape", "grapes", "drapes", "fickle",
    "cocktail", "idiotic", "retardant", "retardants", "retarded growth", "sextant", "sextet",
    "sexton", "suicide squad", "suicide prevention", "suicidal thoughts", "kill the process",
    "shitterton", "arschbombe", "penistone", "fucking austria", "van dyke",
)

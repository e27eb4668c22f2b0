"""The built-in blocklist: strong profanity, slurs and threats, in a few languages.

Deliberately short and unambiguous: words that are abusive in any context a bot
serves. Mild or context-dependent words ("kill", "damn", "hell") are left to the
classifier. Bots add their own terms with ``blocklist`` and ``blocklist_files`` and
switch this list off with ``builtin_terms = false``. Syntax: see ``terms.py``.
"""

from __future__ import annotations

ENGLISH = (
    "fuck*", "*fucker*", "*fucking*", "motherf*", "fck", "fuk", "fuq", "fcuk", "fvck",
    "phuck", "phuk",
    "stfu", "gtfo", "shit", "shitty", "shithead", "bullshit", "*asshole*", "arsehole",
    "dumbass", "jackass", "smartass", "asswipe", "bitch*", "cunt*", "dick", "dickhead",
    "cock", "cocksucker", "prick", "twat", "wanker", "bastard", "slut*", "whore*",
    "retard*", "moron", "idiot*", "imbecile", "scumbag", "douche*", "piss off", "pissed off",
    "nigger*", "nigga*", "faggot*", "fag", "fags", "dyke", "tranny", "kike", "spic",
    "chink", "wetback", "raghead", "paki", "gook", "coon",
    "kill yourself", "kill urself", "kys", "go die", "die in a fire", "hope you die",
    "i will kill you", "ill kill you", "i'll kill you", "gonna kill you", "rape*",
    "you suck", "piece of shit", "son of a bitch", "kiss my ass", "asshat",
)

OTHER_LANGUAGES = (
    # Spanish
    "puta", "putas", "puto", "mierda", "pendejo*", "cabron*", "gilipollas", "coño", "hijo de puta",
    "maricon*", "joder", "estupido", "idiota", "imbecil", "vete a la mierda",
    # French
    "merde", "putain", "connard*", "connasse", "salope*", "enculé*", "encule*",
    "ta gueule", "nique ta mere", "batard", "fils de pute",
    # German
    "scheisse", "arschloch*", "fotze", "wichser", "hurensohn", "fick*", "schlampe",
    "missgeburt", "halt die fresse", "du idiot", "vollidiot",
    # Italian
    "cazzo", "vaffanculo", "stronzo", "stronza", "puttana", "coglione", "figlio di puttana",
    # Portuguese
    "caralho", "filho da puta", "foda-se", "fodase", "viado", "otario", "buceta",
    # Dutch
    "kanker*", "klootzak", "godverdomme", "kut",
)

TERMS = ENGLISH + OTHER_LANGUAGES

# Words that contain blocked parts but are fine.
ALLOWED = (
    "scunthorpe", "cockpit", "cockatoo", "peacock", "hancock", "dickens", "puttanesca",
    "shitake", "shiitake", "rapeseed", "fickle", "cocktail", "idiotic", "retardant",
    "retardants", "retarded growth",
)

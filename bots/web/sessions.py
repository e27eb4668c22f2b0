"""Signed, expiring widget sessions, and identities signed by the embedding site.

A session token says who the visitor is (``user``) and which conversation it may touch
(``conversation``); the server makes it, signs it with a key derived from the adapter's
secret, and trusts nothing a client sends beside it. A token is
``base64url(json claims) "." base64url(HMAC-SHA256)``: no server-side state, so any
front end holding the same secret accepts it.

A site whose visitors are logged in can hand in its own user id with
``HMAC-SHA256(identity_secret, user_id)`` in hex (as Intercom and Crisp do): the session
is then that user's on every device, with the same conversation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

# Keys derived from the one configured secret, so a site's identity hash (made with the
# identity secret, which may be the same) can never pass as a token signature.
_TOKEN_LABEL = b"parley/web/session-token/v1"
_CONVERSATION_LABEL = b"parley/web/conversation/v1"
MAX_TOKEN_CHARS = 2048
MAX_SITE_USER_CHARS = 200

Clock = Callable[[], float]


class TokenRejected(Exception):
    """A token that is malformed, forged, for another bot, or expired; ``code`` says which."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Session:
    """What a valid token vouches for."""

    bot: str
    user_id: str
    conversation_id: str
    expires_at: float
    verified: bool  # the user id was signed by the site, not made up by the server


class SessionSigner:
    """Makes and checks session tokens for one bot; see the module docstring."""

    def __init__(
        self,
        bot: str,
        secret: str,
        *,
        ttl: float,
        identity_secret: str | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.bot = bot
        self.ttl = ttl
        self._key = hmac.new(secret.encode(), _TOKEN_LABEL, hashlib.sha256).digest()
        self._conversation_key = hmac.new(
            secret.encode(), _CONVERSATION_LABEL, hashlib.sha256
        ).digest()
        self._identity_key = (identity_secret or secret).encode()
        self._clock = clock

    def anonymous(self) -> Session:
        """A new visitor: a random user with a conversation of its own."""
        user = "anon-" + secrets.token_urlsafe(18)
        return self._session(user, "c-" + secrets.token_urlsafe(18), verified=False)

    def identified(self, site_user_id: str, signature: str) -> Session:
        """The session of a site's logged-in user, if ``signature`` is the site's HMAC of
        ``site_user_id``; the same conversation on every device."""
        if not site_user_id or len(site_user_id) > MAX_SITE_USER_CHARS:
            raise TokenRejected("bad_identity", "the site user id is empty or too long")
        expected = hmac.new(self._identity_key, site_user_id.encode(), hashlib.sha256)
        if not hmac.compare_digest(expected.hexdigest(), signature.strip().lower()):
            raise TokenRejected("bad_identity", "the identity signature does not match")
        user = "site-" + site_user_id
        digest = hmac.new(self._conversation_key, user.encode(), hashlib.sha256).digest()
        conversation = "c-" + _b64(digest[:18])
        return self._session(user, conversation, verified=True)

    def renewed(self, session: Session) -> Session:
        """``session`` with a fresh expiry."""
        return self._session(session.user_id, session.conversation_id, session.verified)

    def _session(self, user: str, conversation: str, verified: bool) -> Session:
        return Session(self.bot, user, conversation, self._clock() + self.ttl, verified)

    def sign(self, session: Session) -> str:
        """The token of ``session``."""
        claims = {
            "b": session.bot,
            "u": session.user_id,
            "c": session.conversation_id,
            "e": int(session.expires_at),
            "v": int(session.verified),
        }
        body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{self._mac(body)}"

    def verify(self, token: str, *, grace: float = 0.0) -> Session:
        """The session ``token`` vouches for; :class:`TokenRejected` if it does not.

        ``grace`` accepts a token expired at most that many seconds ago (for renewal).
        """
        if not token:
            raise TokenRejected("missing_token", "no session token")
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise TokenRejected("bad_token", "the session token is malformed")
        body, mac = token.split(".")
        if not hmac.compare_digest(self._mac(body), mac):
            raise TokenRejected("bad_token", "the session token's signature does not match")
        try:
            claims = json.loads(_unb64(body))
            session = Session(
                bot=_str(claims["b"]),
                user_id=_str(claims["u"]),
                conversation_id=_str(claims["c"]),
                expires_at=float(claims["e"]),
                verified=bool(claims["v"]),
            )
        except (ValueError, KeyError, TypeError):
            raise TokenRejected("bad_token", "the session token is malformed") from None
        if session.bot != self.bot:
            raise TokenRejected("bad_token", "the session token is for another bot")
        if session.expires_at + grace <= self._clock():
            raise TokenRejected("expired_token", "the session token has expired")
        return session

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def sign_identity(secret: str, site_user_id: str) -> str:
    """What a site's back end computes for its logged-in user (for tests and examples)."""
    return hmac.new(secret.encode(), site_user_id.encode(), hashlib.sha256).hexdigest()

"""Bearer API keys for server-to-server callers: who is calling, and how much at once.

One scheme for ``parley worker``'s OpenAI-compatible API and the web channel's HTTP
chat API. A key (``Authorization: Bearer KEY``) names its holder's tenant; nothing a
request merely claims (a tenant header, a user field) is trusted instead. Keys are
looked up by digest, so the time a lookup takes says nothing about a wrong key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from core.config import ApiKeySection
from core.errors import ParleyError


class Unauthorized(ParleyError):
    """The request carries no key, or one this server does not know."""


class KeyBusy(ParleyError):
    """The key has ``max_in_flight`` requests running already."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """The configured keys of one server; falsy when there are none."""

    def __init__(self, keys: Sequence[ApiKeySection]) -> None:
        self._keys = {_digest(k.key): k for k in keys}
        self._in_flight: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self._keys)

    def caller(self, authorization: str | None) -> ApiKeySection:
        """The key an ``Authorization`` header carries; raises :class:`Unauthorized`."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("an API key is required (Authorization: Bearer KEY)")
        found = self._keys.get(_digest(token.strip()))
        if found is None:
            raise Unauthorized("the API key is not valid")
        return found

    @contextmanager
    def running(self, key: ApiKeySection) -> Iterator[None]:
        """Count a request of ``key`` while the block runs; raises :class:`KeyBusy` at
        once when the key already has ``max_in_flight`` running."""
        now = self._in_flight.get(key.tenant, 0)
        if now >= key.max_in_flight:
            raise KeyBusy(f"API key of {key.tenant} has {now} requests running")
        self._in_flight[key.tenant] = now + 1
        try:
            yield
        finally:
            left = self._in_flight[key.tenant] - 1
            if left:
                self._in_flight[key.tenant] = left
            else:
                del self._in_flight[key.tenant]

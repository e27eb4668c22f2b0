"""Checking that the ports a bot will listen on are free, before anything slow starts.

Loading a model takes seconds; finding out only afterwards that the web port is taken
wastes them. Adapters that listen say where (``listen_addresses``), and ``parley run``
and ``parley check`` try those addresses first.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from core.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where a part of the bot will listen, and the config key that says so."""

    host: str
    port: int
    key: str  # e.g. "adapters.web"


@runtime_checkable
class Listener(Protocol):
    """An adapter (or other part) that will listen on network addresses."""

    def listen_addresses(self) -> list[ListenAddress]:
        """The addresses it binds when started; port 0 means any free port."""
        ...


def addresses_of(parts: Iterable[object]) -> list[ListenAddress]:
    """The listen addresses of those ``parts`` that listen."""
    return [address for part in parts if isinstance(part, Listener)
            for address in part.listen_addresses()]


def ensure_free(addresses: Iterable[ListenAddress], source: str) -> None:
    """Raise a :class:`ConfigError` naming every address that cannot be bound now.

    Binds the way the server will (``SO_REUSEADDR``, as asyncio does on Unix), so a
    port still in TIME_WAIT from a previous run is not reported as taken.
    """
    problems = []
    for address in addresses:
        if address.port == 0:
            continue
        reason = _bind_problem(address.host, address.port)
        if reason:
            problems.append(f"{source}: {address.key}: cannot listen on "
                            f"{address.host}:{address.port}: {reason}")
    if problems:
        raise ConfigError("\n".join(problems))


def _bind_problem(host: str, port: int) -> str | None:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"cannot resolve host: {exc.strerror or exc}"
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # As asyncio's create_server: the IPv6 socket serves IPv6 only, so a
                # dual-stack host's IPv4 entry is probed separately instead of clashing.
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                in_use = exc.errno == errno.EADDRINUSE
                hint = " (another program uses it: stop it or pick another port)" if in_use else ""
                return f"{exc.strerror or exc}{hint}"
    return None

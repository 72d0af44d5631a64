"""Who may connect: API keys, the client's address and its connection count, browser origins.

Sans-I/O: the server hands in what a request carries (headers, query, the peer's address) and
gets a verdict. Every option is off by default. Keys are never logged or shown: each is known
by its key id, the first 8 hex digits of its SHA-256, which names it in /stats and /metrics.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

log = logging.getLogger("fastproxy.access")


class KeyFileError(ValueError):
    """The API key file could not be read; str() says why (never with a key in it)."""


def key_id(key: str) -> str:
    """A short, non-secret name for a key: safe in logs, labels and /stats."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def read_key_file(path: str) -> list[str]:
    """One key a line; blank lines and `#` comments are skipped, whitespace is trimmed."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read API_KEYS_FILE {path}: {exc.__class__.__name__}") from None
    keys = []
    for line in lines:
        key = line.split("#", 1)[0].strip()
        if key:
            keys.append(key)
    return keys


class KeyRing:
    """The accepted API keys: those given inline plus those of the key file.

    Presented tokens are compared by their SHA-256 digest (a dict lookup on digests), so no
    comparison runs over the key's own bytes.
    """

    def __init__(self, keys: Iterable[str] | str = (), path: str = "") -> None:
        if isinstance(keys, str):  # API_KEYS as written ("k1,k2"), not one key per character
            keys = keys.split(",")
        self._inline = [k.strip() for k in keys if k.strip()]
        self._path = path
        self._by_digest: dict[bytes, str] = {}
        self.reloads = 0
        self.reload()

    @property
    def enabled(self) -> bool:
        return bool(self._inline) or bool(self._path)

    @property
    def ids(self) -> list[str]:
        return sorted(set(self._by_digest.values()))

    def reload(self) -> list[str]:
        """Re-read the key file (on SIGHUP). On error the old keys stay and KeyFileError says
        why. Returns the key ids now accepted."""
        keys = list(self._inline)
        if self._path:
            keys += read_key_file(self._path)
        self._by_digest = {_digest(k): key_id(k) for k in keys}
        self.reloads += 1
        return self.ids

    def check(self, token: str | None) -> str | None:
        """The key id of `token` when it is an accepted key, else None."""
        if not token:
            return None
        return self._by_digest.get(_digest(token))


def request_token(authorization: str | None, query: bytes) -> str | None:
    """The token a request presents: `Authorization: Bearer KEY`, else `?token=KEY`."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if query:
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if name == "token" and value:
                return value
    return None


class ClientAddress:
    """The client's address: the TCP peer, or X-Forwarded-For's when the peer is a trusted
    proxy. The header is read right to left, skipping trusted hops, so a client cannot put an
    address of its choosing in front of what the load balancer appended."""

    def __init__(self, trusted: Iterable[str] = ()) -> None:
        self._trusted = [ipaddress.ip_network(net, strict=False) for net in trusted]

    def is_trusted(self, address: str) -> bool:
        if not self._trusted:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._trusted)

    def resolve(self, peer: str, forwarded_for: str | None) -> str:
        if not forwarded_for or not self.is_trusted(peer):
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return peer  # a malformed header is not to be believed
            if not self.is_trusted(hop):
                return hop
        return hops[0] if hops else peer


class AddressLimit:
    """Connections held per client address, against MAX_CONNECTIONS_PER_IP (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: dict[str, int] = {}

    def full(self, address: str) -> bool:
        return self.limit > 0 and self.held.get(address, 0) >= self.limit

    def add(self, address: str) -> None:
        self.held[address] = self.held.get(address, 0) + 1

    def remove(self, address: str) -> None:
        count = self.held.get(address, 0) - 1
        if count > 0:
            self.held[address] = count
        else:
            self.held.pop(address, None)


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """Browsers send Origin; other clients do not, and are not refused for it."""
    if not allowed or origin is None or "*" in allowed:
        return True
    return origin.strip().rstrip("/").lower() in allowed


@dataclass(slots=True)
class KeyUsage:
    """What one key's clients did (counted under its key id)."""

    clients: int = 0
    connections: int = 0
    messages_sent: int = 0
    requests: int = 0

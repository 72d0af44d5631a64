"""The Redis engine's own options, carried in REDIS_URL's query and removed before redis-py
sees the URL, and the URL rewrites a cluster needs. No redis-py here: config checks the options
at start through this module without loading the engine."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


@dataclass(frozen=True)
class BusOptions:
    cluster: bool | None = None  # None: ask the server
    prefix: str = "fp"
    ttl: float = 10.0


def parse_redis_url(url: str) -> tuple[str, BusOptions]:
    """Split the bus's own options off a Redis URL: (URL for redis-py, options).

    Raises ConfigError (a ValueError) naming REDIS_URL and the option for a bad value.
    """
    parts = urlsplit(url)
    keep: list[tuple[str, str]] = []
    cluster: bool | None = None
    prefix, ttl = BusOptions.prefix, BusOptions.ttl
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "cluster":
            choice = value.strip().lower()
            if choice in ("1", "yes", "true", "on"):
                cluster = True
            elif choice in ("0", "no", "false", "off"):
                cluster = False
            elif choice not in ("", "auto"):
                raise ValueError(f"REDIS_URL option cluster={value!r}: expected yes, no or auto")
        elif name == "prefix":
            if not value or any(c in value for c in "{} \t\r\n"):
                raise ValueError(
                    f"REDIS_URL option prefix={value!r}: expected a non-empty name without braces"
                )
            prefix = value
        elif name == "ttl":
            try:
                ttl = float(value)
            except ValueError:
                ttl = 0.0
            if not 1.0 <= ttl <= 3600.0:
                raise ValueError(f"REDIS_URL option ttl={value!r}: expected 1 to 3600 seconds")
        else:
            keep.append((name, value))
    stripped = urlunsplit(parts._replace(query=urlencode(keep)))
    return stripped, BusOptions(cluster, prefix, ttl)


def with_host(url: str, host: str, port: int) -> str:
    """The URL with another host and port (a cluster node), keeping credentials and options."""
    parts = urlsplit(without_db(url))
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def without_db(url: str) -> str:
    """A cluster has only database 0; a path in the URL would make redis-py refuse it."""
    return urlunsplit(urlsplit(url)._replace(path=""))

"""Configuration: one table of settings, read from the environment and overridden by CLI flags.

Every setting has an environment variable (the original proxy's names are kept) and a flag
(`--max-clients-total` for MAX_CLIENTS_TOTAL). A bad value stops the start with one line naming
the variable and what it accepts.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from fastproxy.bus.redis.options import parse_redis_url

BYBIT_MAINNET_WS = "wss://stream.bybit.com/v5/public/linear"
BYBIT_TESTNET_WS = "wss://stream-testnet.bybit.com/v5/public/linear"


class ConfigError(ValueError):
    """A setting with a value it does not accept. str() is the one line shown to the operator."""


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("true or false")


def _int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            upper = f" and at most {high}" if high is not None else ""
            raise ValueError(f"a whole number of at least {low}{upper}")
        return value

    return parse


def _seconds(low: float = 0.0, *, allow_zero: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            value = float("nan")
        if not (value > low or (allow_zero and value == low)) or value != value:
            bound = f"{low:g} or more" if allow_zero else f"more than {low:g}"
            raise ValueError(f"a number of seconds, {bound}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(" or ".join(options))
        return value

    return parse


def _ws_url(raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("a ws:// or wss:// URL")
    return raw.strip()


def _http_url(raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an http:// or https:// URL")
    return raw.strip().rstrip("/")


def _redis_url(raw: str) -> str:
    value = raw.strip()
    if not value:
        return value
    if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("a redis://, rediss:// or unix:// URL, or empty for one node")
    # The bus's own options (?cluster=, ?prefix=, ?ttl=) are checked here, so a bad one fails
    # at start with one line like every other setting.
    try:
        parse_redis_url(value)
    except ValueError as exc:
        raise ValueError(f"valid options: {exc}") from None
    return value


def _text(raw: str) -> str:
    return raw.strip()


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _host(raw: str) -> str:
    value = raw.strip()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.match(value):
            raise ValueError("an IP address (0.0.0.0, ::, 127.0.0.1) or a host name") from None
    return value


def _words(raw: str) -> tuple[str, ...]:
    return tuple(word for word in (part.strip() for part in raw.split(",")) if word)


def _networks(raw: str) -> tuple[str, ...]:
    nets = []
    for word in _words(raw):
        try:
            nets.append(str(ipaddress.ip_network(word, strict=False)))
        except ValueError:
            raise ValueError("comma-separated CIDRs such as 10.0.0.0/8,127.0.0.1/32") from None
    return tuple(nets)


def _origins(raw: str) -> tuple[str, ...]:
    origins = []
    for word in _words(raw):
        if word != "*":
            parts = urlsplit(word)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
                raise ValueError("comma-separated origins such as https://app.example.com, or *")
            word = f"{parts.scheme}://{parts.netloc}".lower()
        origins.append(word)
    return tuple(origins)


def _readable_file(raw: str) -> str:
    value = raw.strip()
    if value and not os.access(value, os.R_OK):
        raise ValueError("a readable file, or empty")
    return value


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _workers(raw: str) -> int:
    value = raw.strip().lower()
    if value == "auto":
        return usable_cpus()
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= 1024:
        raise ValueError("a whole number from 1 to 1024, or auto (one per usable CPU)")
    return count


@dataclass(frozen=True)
class Setting:
    env: str
    parse: Callable[[str], Any]
    default: str
    help: str
    secret: bool = False  # never shown: not in errors, not in logs

    @property
    def attr(self) -> str:
        return self.env.lower()

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("HOST", _host, "0.0.0.0", "address to listen on"),
    Setting("PORT", _int_range(0, 65535), "8000", "port for WS /ws and the HTTP endpoints"),
    Setting(
        "WORKERS",
        _workers,
        "1",
        "worker processes serving the port (auto: one per usable CPU); one feed for all",
    ),
    Setting("REDIS_URL", _redis_url, "", "Redis for cluster mode; empty: one node, in-memory bus"),
    Setting("REDIS_MAX_CONNECTIONS", _int_range(1), "50", "Redis connection pool size"),
    Setting("DEBUG", _bool, "false", "debug logging"),
    Setting("ENVIRONMENT", _text, "production", "environment name, shown in the start-up log line"),
    Setting("LOG_FORMAT", _choice("json", "text"), "json", "log line format: json or text"),
    Setting("MAX_CLIENTS_TOTAL", _int_range(1), "10000", "most clients connected at once"),
    Setting(
        "MAX_SUBSCRIPTIONS_PER_CLIENT", _int_range(1), "100", "most streams one client may hold"
    ),
    Setting(
        "MAX_MESSAGE_RATE_PER_CLIENT",
        _int_range(1),
        "100",
        "most frames a client may send a second, control frames (ping, pong) included",
    ),
    Setting(
        "MAX_STREAM_CHANGE_RATE_PER_CLIENT",
        _int_range(1),
        "200",
        "most streams a client may subscribe plus unsubscribe a second",
    ),
    Setting(
        "MAX_SNAPSHOT_RATE_PER_CLIENT",
        _int_range(1),
        "100",
        "most snapshots (newly subscribed streams) a client may cause a second",
    ),
    Setting(
        "CLIENT_IDLE_TIMEOUT",
        _seconds(),
        "300",
        "seconds without any frame from a client before it is closed (4000)",
    ),
    Setting(
        "FANOUT_CALLBACK_TIMEOUT",
        _seconds(),
        "5",
        "seconds a client may take nothing while data waits, leave an event undelivered, or "
        "(policy drop) stay over the soft mark, before it is closed (4008)",
    ),
    Setting(
        "WRITE_BUFFER_SOFT_LIMIT",
        _int_range(1024),
        "16384",
        "bytes unread by a client in user space: over it, the client is conflated (or dropped)",
    ),
    Setting(
        "WRITE_BUFFER_HARD_LIMIT",
        _int_range(1024),
        "4194304",
        "bytes unread by a client (user space plus kernel): closed with 4008 at once",
    ),
    Setting(
        "SLOW_CLIENT_POLICY",
        _choice("conflate", "drop"),
        "conflate",
        "a client over the soft mark: conflate (newest state replaces older, events kept) "
        "or drop (4008 after FANOUT_CALLBACK_TIMEOUT)",
    ),
    Setting(
        "CLIENT_NOTSENT_LOWAT",
        _int_range(0),
        "4096",
        "bytes a client socket may hold unsent in the kernel (TCP_NOTSENT_LOWAT); 0: no bound",
    ),
    Setting(
        "CLIENT_SNDBUF",
        _int_range(0),
        "0",
        "kernel send buffer per client socket (SO_SNDBUF); 0: the kernel sizes it",
    ),
    Setting(
        "COMPRESSION",
        _bool,
        "on",
        "permessage-deflate for clients that offer it (on or off); each message is compressed "
        "once and the same bytes go to every such client",
    ),
    Setting(
        "UNSUBSCRIBE_LINGER",
        _seconds(allow_zero=True),
        "5",
        "seconds a stream is kept upstream after its last subscriber leaves",
    ),
    Setting(
        "UPSTREAM_DOWN_THRESHOLD",
        _seconds(allow_zero=True),
        "30",
        "seconds the upstream may be down before /health says degraded",
    ),
    Setting("BYBIT_WS_URL", _ws_url, BYBIT_MAINNET_WS, "Bybit V5 public linear WebSocket URL"),
    Setting("BYBIT_TESTNET", _bool, "false", "use Bybit testnet when BYBIT_WS_URL is not set"),
    Setting(
        "BYBIT_REST_URL",
        lambda raw: _http_url(raw) if raw.strip() else "",
        "",
        "REST base for the symbol list; empty: derived from BYBIT_WS_URL",
    ),
    Setting("UPSTREAM_PING_INTERVAL", _seconds(), "20", "seconds between JSON pings to Bybit"),
    Setting(
        "UPSTREAM_STALE_AFTER",
        _seconds(0.2),
        "3",
        "seconds without any frame from Bybit before a connection's streams are marked stale "
        "(a quiet connection is pinged after half of it)",
    ),
    Setting(
        "UPSTREAM_MAX_FRAME_AGE",
        _seconds(allow_zero=True),
        "5",
        "seconds old (by its exchange timestamp) a Bybit frame may be and still count as live; "
        "older frames mark the stream stale until fresh ones come (0: no check)",
    ),
    Setting(
        "UPSTREAM_TOPICS_PER_CONNECTION",
        _int_range(1),
        "200",
        "most topics on one Bybit connection",
    ),
    Setting(
        "HISTORY_MAX_MESSAGES",
        _int_range(0),
        "1000",
        "most recent Messages kept per stream for resumes (0: no history, no resume)",
    ),
    Setting(
        "HISTORY_MAX_AGE",
        _seconds(allow_zero=True),
        "30",
        "seconds a Message is kept for resumes",
    ),
    Setting(
        "HISTORY_MAX_BYTES",
        _int_range(0),
        "134217728",
        "bytes all streams' history may use together; the node's oldest Messages go first",
    ),
    Setting(
        "SHUTDOWN_TIMEOUT", _seconds(), "10", "seconds a graceful stop may take before exiting"
    ),
    Setting(
        "API_KEYS",
        _words,
        "",
        "comma-separated keys a client must present on /ws (Bearer header or ?token=); "
        "empty with no API_KEYS_FILE: open",
        secret=True,
    ),
    Setting(
        "API_KEYS_FILE",
        _readable_file,
        "",
        "file of API keys, one a line (# comments); re-read on SIGHUP",
    ),
    Setting(
        "METRICS_TOKEN",
        _text,
        "",
        "token for /metrics and /stats; empty: an API key if keys are set, else open",
        secret=True,
    ),
    Setting(
        "MAX_CONNECTIONS_PER_IP",
        _int_range(0),
        "0",
        "most WebSocket connections from one client address (429); 0: no limit",
    ),
    Setting(
        "TRUSTED_PROXIES",
        _networks,
        "",
        "CIDRs of load balancers whose X-Forwarded-For names the client address",
    ),
    Setting(
        "ALLOWED_ORIGINS",
        _origins,
        "",
        "comma-separated browser origins allowed on /ws (403 otherwise); empty: any",
    ),
    Setting(
        "TLS_CERT", _readable_file, "", "PEM certificate (chain) file: serve wss:// and https://"
    ),
    Setting("TLS_KEY", _readable_file, "", "PEM private key file for TLS_CERT"),
)


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 8000
    workers: int = 1
    redis_url: str = ""
    redis_max_connections: int = 50
    debug: bool = False
    environment: str = "production"
    log_format: str = "json"
    max_clients_total: int = 10000
    max_subscriptions_per_client: int = 100
    max_message_rate_per_client: int = 100
    max_stream_change_rate_per_client: int = 200
    max_snapshot_rate_per_client: int = 100
    client_idle_timeout: float = 300.0
    fanout_callback_timeout: float = 5.0
    write_buffer_soft_limit: int = 16384
    write_buffer_hard_limit: int = 4194304
    slow_client_policy: str = "conflate"
    client_notsent_lowat: int = 4096
    client_sndbuf: int = 0
    compression: bool = True
    unsubscribe_linger: float = 5.0
    upstream_down_threshold: float = 30.0
    bybit_ws_url: str = BYBIT_MAINNET_WS
    bybit_testnet: bool = False
    bybit_rest_url: str = ""
    upstream_ping_interval: float = 20.0
    upstream_stale_after: float = 3.0
    upstream_max_frame_age: float = 5.0
    upstream_topics_per_connection: int = 200
    history_max_messages: int = 1000
    history_max_age: float = 30.0
    history_max_bytes: int = 134217728
    shutdown_timeout: float = 10.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    api_keys_file: str = ""
    metrics_token: str = field(default="", repr=False)
    max_connections_per_ip: int = 0
    trusted_proxies: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    demo: bool = field(default=False)

    def __post_init__(self) -> None:
        # A list setting given in code as one string ("a,b", as the environment gives it) is
        # parsed as the environment's would be, never taken character by character.
        for name, parse in (
            ("api_keys", _words),
            ("trusted_proxies", _networks),
            ("allowed_origins", _origins),
        ):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, parse(value))

    def replace(self, **changes: Any) -> Config:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Config(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; the flag's value wins over the environment."""
    group = parser.add_argument_group("settings (each also read from the environment variable)")
    for setting in SETTINGS:
        group.add_argument(
            setting.flag,
            dest=setting.attr,
            metavar=setting.env,
            default=None,
            help=f"{setting.help} (env {setting.env}, default {setting.default or 'empty'!r})",
        )


def load(
    flags: Mapping[str, str | None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build a Config from flags (by attribute name) over environment variables over defaults."""
    environ = os.environ if environ is None else environ
    flags = flags or {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        from_flag = flags.get(setting.attr)
        if from_flag is not None:
            raw, source = from_flag, setting.flag
        elif setting.env in environ:
            raw, source = environ[setting.env], setting.env
        else:
            raw, source = setting.default, setting.env
        try:
            values[setting.attr] = setting.parse(raw)
        except ValueError as exc:
            shown = raw if len(raw) <= 60 else raw[:57] + "..."
            if setting.secret:
                shown = "<hidden>"
            raise ConfigError(f"{source}={shown!r} is not valid: expected {exc}") from None
    url_given = flags.get("bybit_ws_url") is not None or "BYBIT_WS_URL" in environ
    if values["bybit_testnet"] and not url_given:
        values["bybit_ws_url"] = BYBIT_TESTNET_WS
    if values["write_buffer_soft_limit"] > values["write_buffer_hard_limit"]:
        raise ConfigError(
            "WRITE_BUFFER_SOFT_LIMIT must not be larger than WRITE_BUFFER_HARD_LIMIT "
            f"({values['write_buffer_soft_limit']} > {values['write_buffer_hard_limit']})"
        )
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ConfigError("TLS_CERT and TLS_KEY go together: set both for TLS, or neither")
    return Config(**values)


def config_from_args(
    namespace: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Config:
    flags = {s.attr: getattr(namespace, s.attr, None) for s in SETTINGS}
    return load(flags, environ)


def describe(settings: Sequence[Setting] = SETTINGS) -> str:
    """The settings table as Markdown, for the README."""
    rows = ["| Variable | Flag | Default | Meaning |", "|---|---|---|---|"]
    for s in settings:
        rows.append(f"| `{s.env}` | `{s.flag}` | `{s.default}` | {s.help} |")
    return "\n".join(rows)


def env_example(settings: Sequence[Setting] = SETTINGS) -> str:
    """The text of .env.example: every variable with its default, commented out (a set
    variable counts as given: BYBIT_WS_URL set to its default would override BYBIT_TESTNET)."""
    lines = [
        "# fastproxy settings. Copy to .env, uncomment what you change.",
        "# Each line shows the default; the same table is in the README (Configuration).",
        "# Generated by `python -m fastproxy.config > .env.example`.",
    ]
    for s in settings:
        lines += ["", f"# {s.help}", f"#{s.env}={s.default}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(env_example(), end="")

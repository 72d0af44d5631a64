"""Wiring: build the components from a Config, run them, stop them gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from typing import Any

from fastproxy import __version__
from fastproxy.bus import Bus, MemoryBus
from fastproxy.codec import IMPLEMENTATION
from fastproxy.config import Config, ConfigError
from fastproxy.feed import Feed
from fastproxy.history import History
from fastproxy.hub import Hub
from fastproxy.latency import Histogram
from fastproxy.logs import setup_logging
from fastproxy.metrics import metrics_renderer
from fastproxy.server import ProxyServer
from fastproxy.upstream import SymbolCatalogue, UpstreamSettings, default_rest_url

log = logging.getLogger("fastproxy")


class App:
    """One proxy node. `await start()`, then `await stop()`; `port` is the bound port."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.sim: Any = None
        self.started_at = time.time()
        self.feed: Feed | None = None
        self.bus: Bus | None = None
        self.hub: Hub | None = None
        self.server: ProxyServer | None = None
        self.catalogue: SymbolCatalogue | None = None
        self._stopped = asyncio.Event()

    @property
    def port(self) -> int:
        return self.server.port if self.server else 0

    async def start(self) -> None:
        config = self.config
        ws_url, rest_url = config.bybit_ws_url, config.bybit_rest_url
        if config.demo:
            from fastproxy.sim import SimConfig, Simulator

            self.sim = Simulator(SimConfig(host="127.0.0.1", port=0))
            await self.sim.start()
            ws_url, rest_url = self.sim.ws_url("linear"), self.sim.http_url
            log.info("demo mode: upstream is the bundled simulator", extra={"url": ws_url})
        settings = upstream_settings(config, ws_url)
        self.catalogue = SymbolCatalogue(rest_url or default_rest_url(ws_url))
        # feed -> bus -> hub: the feed's output goes to the bus engine, which decides what
        # this node's hub gets (fastproxy.bus); the hub asks the bus for streams
        self.feed = Feed(settings)
        self.bus = self._make_bus(self.feed)
        self.hub = Hub(
            self.bus,
            linger=config.unsubscribe_linger,
            history=history_of(config),
        )
        self.bus.attach(self.hub)
        self.server = ProxyServer(
            config,
            self.hub,
            symbol_known=self.catalogue.check,
            health=self.health,
            stats=self.stats,
            metrics=metrics_renderer(self.stats, self.latency),
            version=__version__,
        )
        await self.feed.start()
        await self.bus.start()
        await self.server.start()
        # In the background: an exchange whose instrument list does not answer must not keep
        # the port closed; until the list is known, symbols get syntax checks only.
        await self.catalogue.start()
        log.info(
            "fastproxy listening",
            extra={
                "host": config.host,
                "port": self.port,
                "upstream": ws_url,
                "bus": self.bus.name,
                "codec": IMPLEMENTATION,
                "environment": config.environment,
                "tls": bool(config.tls_cert),
                "api_keys": len(self.server.keys.ids) if self.server.keys.enabled else "off",
            },
        )

    def _make_bus(self, feed: Feed) -> Bus:
        if not self.config.redis_url:
            return MemoryBus(feed)
        from fastproxy.bus.redis.shell import RedisBus

        return RedisBus(feed, self.config)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.drain()
        if self.hub is not None:
            self.hub.close()
        if self.bus is not None:
            await self.bus.stop()  # hands owned streams over while the feed still runs
        if self.feed is not None:
            await self.feed.stop()
        if self.catalogue is not None:
            await self.catalogue.stop()
        if self.server is not None:
            await self.server.stop()
        if self.sim is not None:
            await self.sim.stop()
        self._stopped.set()

    # -- observability -------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        assert self.feed is not None and self.bus is not None
        upstream = self.feed.pool.status()
        reasons = health_reasons(self.config, upstream, self.bus)
        body: dict[str, Any] = {"upstream": upstream, "bus": self.bus.status()}
        assert self.hub is not None
        stale = self.hub.freshness.stale_ids()
        if stale:
            reasons.append(f"{len(stale)} streams stale")
        body["stale_streams"] = len(stale)
        if stale:
            body["stale"] = sorted(stale)[:20]
        if reasons:
            body["reason"] = "; ".join(reasons)
        return not reasons, body

    def stats(self) -> dict[str, Any]:
        assert self.server and self.hub and self.feed and self.bus and self.catalogue
        hub = self.hub.stats()
        return {
            "uptime": round(time.time() - self.started_at, 1),
            "connections": self.server.stats(),
            "upstream": self.feed.pool.status(),
            "hub": hub,
            "pubsub": hub,  # the same figures under their first name, for existing readers
            "bus": self.bus.status(),
            "feed": feed_figures(self.feed),
            "catalogue": self.catalogue.status(),
        }

    def latency(self) -> dict[str, dict[str, Histogram]]:
        assert self.feed is not None and self.hub is not None
        return {"exchange_lag": self.feed.lag, "residence": self.hub.residence}

    def reload(self) -> None:
        """SIGHUP: re-read what may change without a restart (the API key file)."""
        if self.server is not None:
            self.server.reload_keys()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        await stop.wait()
        log.info("shutting down")
        try:
            await asyncio.wait_for(self.stop(), self.config.shutdown_timeout)
        except TimeoutError:
            log.warning("graceful stop took too long; exiting anyway")


def upstream_settings(config: Config, ws_url: str) -> UpstreamSettings:
    """The upstream pool's settings from the config (one node, or a machine's feed process)."""
    return UpstreamSettings(
        url=ws_url,
        ping_interval=config.upstream_ping_interval,
        stale_after=config.upstream_stale_after,
        max_frame_age=config.upstream_max_frame_age,
        max_topics_per_conn=config.upstream_topics_per_connection,
    )


def history_of(config: Config) -> History:
    """The rings resumes are served from, bounded as configured."""
    return History(config.history_max_messages, config.history_max_age, config.history_max_bytes)


def feed_figures(feed: Feed) -> dict[str, Any]:
    return {
        "streams": feed.stream_count,
        "messages_out": feed.messages_out,
        "codec_errors": feed.codec_errors,
        "old_frames": feed.old_frames,
        "book_resyncs": dict(feed.resyncs),
        "codec": IMPLEMENTATION,
    }


def health_reasons(config: Config, upstream: dict[str, Any], bus: Bus) -> list[str]:
    """Why the node is degraded (nothing: healthy), from its upstream pool and bus."""
    reasons = []
    down_since = upstream.get("down_since")  # epoch ms
    down_for = None if down_since is None else time.time() - down_since / 1000
    if down_for is not None and down_for > config.upstream_down_threshold:
        reasons.append(f"upstream down for {down_for:.0f} s")
    if not bus.healthy:
        reasons.append(bus.status().get("reason") or "redis unreachable")
    return reasons


def run(config: Config) -> int:
    import uvloop

    setup_logging(config.log_format, config.debug, config.environment)
    try:
        uvloop.run(App(config).run_until_signalled())
    except ssl.SSLError as exc:  # TLS_CERT / TLS_KEY unusable (before OSError: a subclass)
        log.error("cannot load TLS_CERT=%s TLS_KEY=%s: %s", config.tls_cert, config.tls_key, exc)
        return 1
    except OSError as exc:  # port in use, address not available, no such host
        log.error(
            "cannot listen on HOST=%s PORT=%s: %s",
            config.host,
            config.port,
            exc.strerror or exc,
        )
    except ConfigError as exc:  # a Redis unfit for cluster mode
        log.error("cannot start: %s", exc)
        return 1
    return 0

"""Every core of the machine: a supervisor, one feed, N workers on one port.

`fastproxy --workers N` runs this process as the supervisor and feed process of the machine:
it holds the upstream connections, the codecs and the real bus engine (memory alone, or Redis
in a cluster, where the machine is one node and this is its only Redis client), and hands
each Message's bytes to the workers over the local bus (fastproxy.bus.local). It starts N
worker processes that each listen on the same port with SO_REUSEPORT, so the kernel spreads
connections over them, and serve the clients.

- A worker that dies is replaced, after a back-off that grows while it keeps dying soon after
  its start; if one keeps dying (RestartPolicy), the supervisor stops everything and exits 1.
- SIGTERM (or SIGINT) is forwarded: every worker closes its clients with 1001 and exits, then
  the feed stops; the exit status is 0.
- MAX_CLIENTS_TOTAL holds for the machine: the workers count their clients in shared memory.
- /stats and /metrics are the node's whichever worker answers: every worker reports to the feed
  process, which sends every worker the same node snapshot twice a second.

The supervisor keeps a bound (not listening) socket on the port for its whole life, so the
port is resolved once (PORT=0 works) and a replaced worker can always bind it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from fastproxy import __version__, ipc, nodestats
from fastproxy.app import feed_figures, health_reasons, history_of, upstream_settings
from fastproxy.bus import Bus, MemoryBus
from fastproxy.bus.local import LocalBus, LocalHub
from fastproxy.codec import IMPLEMENTATION
from fastproxy.config import Config, ConfigError
from fastproxy.feed import Feed
from fastproxy.hub import Hub
from fastproxy.logs import setup_logging
from fastproxy.metrics import metrics_renderer
from fastproxy.server import ProxyServer
from fastproxy.upstream import SymbolCatalogue, default_rest_url

log = logging.getLogger("fastproxy.supervisor")

REPORT_INTERVAL = 0.5  # workers report, and the feed sends the node snapshot, this often
NODE_STALE = 5.0  # a worker without a node snapshot this long says the node is degraded
EXIT_FEED_LOST = 3  # a worker's exit status when the feed process went away


# -- restarts (sans-I/O) ---------------------------------------------------------------------


@dataclass
class RestartPolicy:
    """When to start a dead worker again, and when to give up.

    A worker that lived less than `early` seconds died early; each early death in a row doubles
    the wait (from `first` up to `longest`), and the `give_up`-th one in a row ends the node.
    A worker that lived longer starts over at the first wait.
    """

    first: float = 0.5
    longest: float = 5.0
    early: float = 30.0
    give_up: int = 5
    early_deaths: dict[int, int] = field(default_factory=dict)

    def on_death(self, worker: int, lived: float) -> float | None:
        """Seconds to wait before the restart, or None: the node should stop."""
        deaths = self.early_deaths.get(worker, 0) + 1 if lived < self.early else 1
        self.early_deaths[worker] = deaths if lived < self.early else 0
        if lived < self.early and deaths >= self.give_up:
            return None
        return min(self.longest, self.first * 2 ** (deaths - 1))


# -- MAX_CLIENTS_TOTAL for the machine -----------------------------------------------------


class NodeSeats:
    """The workers' client counts in shared memory, one slot each, under one lock: a worker
    admits a client only while the machine's sum is under the limit."""

    def __init__(self, counts: Any, lock: Any, index: int, limit: int) -> None:
        self.counts = counts
        self.lock = lock
        self.index = index
        self.limit = limit

    def take(self) -> bool:
        with self.lock:
            if sum(self.counts) >= self.limit:
                return False
            self.counts[self.index] += 1
            return True

    def give(self) -> None:
        with self.lock:
            self.counts[self.index] -= 1


def clear_seats(counts: Any, lock: Any, index: int) -> None:
    """A dead worker's clients are gone. Its count is zeroed; if it died holding the lock
    (it holds it for a few instructions, so a second is an eternity), the lock is freed."""
    if not lock.acquire(timeout=1.0):
        log.warning("a dead worker held the client-count lock; freeing it", extra={"worker": index})
        with contextlib.suppress(ValueError):
            lock.release()
        lock.acquire()
    try:
        counts[index] = 0
    finally:
        lock.release()


# -- the supervisor and feed process -------------------------------------------------------


def _hold_port(host: str, port: int) -> socket.socket:
    """A bound, never listening socket in the port's SO_REUSEPORT group (no connections go to
    it): the port is ours from the start, and PORT=0 resolves to one port for every worker."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class _Slot:
    index: int
    process: Any = None
    started: float = 0.0
    restarts: int = 0
    timer: asyncio.TimerHandle | None = None


class Supervisor:
    def __init__(self, config: Config, policy: RestartPolicy | None = None) -> None:
        self.config = config
        self.policy = policy or RestartPolicy()
        self.started_at = time.time()
        self.sim: Any = None
        self.feed: Feed | None = None
        self.engine: Bus | None = None
        self.local: LocalHub | None = None
        self.catalogue: SymbolCatalogue | None = None
        self.slots = [_Slot(i) for i in range(config.workers)]
        self.retired: dict[str, Any] = {}
        self.restarts = 0
        self.exit_code = 0
        self._ctx = multiprocessing.get_context("spawn")
        self._counts = self._ctx.RawArray("q", config.workers)
        self._lock = self._ctx.Lock()
        self._stop = asyncio.Event()
        self._stopping = False
        self._worker_config = config
        self._path = ""

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        holder = _hold_port(self.config.host, self.config.port)
        tmpdir = tempfile.mkdtemp(prefix="fastproxy-")
        self._path = os.path.join(tmpdir, "feed.sock")
        reporter: asyncio.Task[None] | None = None
        try:
            await self._start_feed(holder.getsockname()[1])
            reporter = loop.create_task(self._report())
            for slot in self.slots:
                self._spawn(slot)
            log.info(
                "fastproxy supervisor running",
                extra={
                    "port": self._worker_config.port,
                    "workers": self.config.workers,
                    "bus": f"local+{self.engine.name if self.engine else '?'}",
                    "codec": IMPLEMENTATION,
                    "environment": self.config.environment,
                },
            )
            await self._stop.wait()
            log.info("shutting down: draining every worker")
            await self._stop_workers()
        finally:
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
            await self._stop_feed()
            holder.close()
            shutil.rmtree(tmpdir, ignore_errors=True)
        return self.exit_code

    async def _start_feed(self, port: int) -> None:
        config = self.config
        ws_url, rest_url = config.bybit_ws_url, config.bybit_rest_url
        if config.demo:
            from fastproxy.sim import SimConfig, Simulator

            self.sim = Simulator(SimConfig(host="127.0.0.1", port=0))
            await self.sim.start()
            ws_url, rest_url = self.sim.ws_url("linear"), self.sim.http_url
            log.info("demo mode: upstream is the bundled simulator", extra={"url": ws_url})
        self._worker_config = config.replace(
            port=port, demo=False, bybit_ws_url=ws_url, bybit_rest_url=rest_url
        )
        self.feed = Feed(upstream_settings(config, ws_url))
        # fetched once for the machine; the workers get it over the local bus
        self.catalogue = SymbolCatalogue(rest_url or default_rest_url(ws_url))
        if config.redis_url:
            from fastproxy.bus.redis.shell import RedisBus

            self.engine = RedisBus(self.feed, config)
        else:
            self.engine = MemoryBus(self.feed)
        # the machine's history: a client resuming on any worker is served from it
        self.local = LocalHub(
            self.engine, self._path, linger=config.unsubscribe_linger, history=history_of(config)
        )
        await self.local.start()
        await self.feed.start()
        await self.engine.start()
        await self.catalogue.start()  # in the background: the port opens without waiting

    async def _stop_feed(self) -> None:
        if self.catalogue is not None:
            await self.catalogue.stop()
        if self.local is not None:
            await self.local.stop()
        if self.engine is not None:
            await self.engine.stop()  # hands owned streams over while the feed still runs
        if self.feed is not None:
            await self.feed.stop()
        if self.sim is not None:
            await self.sim.stop()

    # -- workers -------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        slot.timer = None
        if self._stopping:
            return
        process = self._ctx.Process(
            target=worker_main,
            args=(self._worker_config, slot.index, self._path, self._counts, self._lock),
            name=f"fastproxy-worker-{slot.index}",
            daemon=False,
        )
        process.start()
        slot.process, slot.started = process, time.monotonic()
        asyncio.get_running_loop().add_reader(process.sentinel, self._reap, slot)
        log.info("worker started", extra={"worker": slot.index, "pid": process.pid})

    def _reap(self, slot: _Slot) -> None:
        process = slot.process
        asyncio.get_running_loop().remove_reader(process.sentinel)
        # The sentinel closes as the process exits, a moment before it can be waited for.
        process.join(2.0)
        if process.is_alive():  # it closed the sentinel itself and lives on: end it
            process.kill()
            process.join()
        code = process.exitcode
        assert self.local is not None
        report = self.local.reports.pop(slot.index, None)
        if report is not None:
            nodestats.retire(self.retired, report)
        clear_seats(self._counts, self._lock, slot.index)
        process.close()
        slot.process = None
        if self._stopping:
            return
        lived = time.monotonic() - slot.started
        wait = self.policy.on_death(slot.index, lived)
        if wait is None:
            log.error(
                "worker keeps dying; stopping the node",
                extra={"worker": slot.index, "exit": code, "lived": round(lived, 1)},
            )
            self.exit_code = 1
            self._stop.set()
            return
        log.warning(
            "worker died; starting another",
            extra={"worker": slot.index, "exit": code, "lived": round(lived, 1), "wait": wait},
        )
        self.restarts += 1
        slot.restarts += 1
        slot.timer = asyncio.get_running_loop().call_later(wait, self._spawn, slot)

    async def _stop_workers(self) -> None:
        self._stopping = True
        for slot in self.slots:
            if slot.timer is not None:
                slot.timer.cancel()
            if slot.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_timeout + 2.0
        while any(s.process is not None for s in self.slots) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for slot in self.slots:
            if slot.process is not None:
                log.warning("worker did not stop in time; killed", extra={"worker": slot.index})
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while any(s.process is not None for s in self.slots) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # -- the node's numbers --------------------------------------------------------------

    async def _report(self) -> None:
        shared: frozenset[str] | None = None
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            assert self.local is not None and self.catalogue is not None
            symbols = self.catalogue.symbols
            if symbols is not None and symbols is not shared:
                self.local.share_symbols(symbols)
                shared = symbols
            self.local.broadcast(ipc.encode_json(ipc.NODE, self.snapshot()))

    def snapshot(self) -> dict[str, Any]:
        assert self.feed is not None and self.engine is not None and self.local is not None
        reports = self.local.reports
        bus = {**self.engine.status(), "engine": f"local+{self.engine.name}"}
        bus["local"] = self.local.figures()
        return {
            "at": time.time(),
            "started_at": self.started_at,
            "supervisor": {
                "pid": os.getpid(),
                "workers": self.config.workers,
                "alive": sum(1 for s in self.slots if s.process is not None),
                "restarts": self.restarts,
            },
            "workers": {str(index): reports[index] for index in sorted(reports)},
            "totals": nodestats.totals(reports.values(), self.retired),
            "streams": self.local.stream_count,
            "streams_by_kind": self.local.streams_by_kind(),
            "upstream": self.feed.pool.status(),
            "bus": bus,
            "engine": self.engine.status(),
            "feed": feed_figures(self.feed),
            "catalogue": self.catalogue.status() if self.catalogue is not None else {},
            "health": self._health(),
        }

    def _health(self) -> list[Any]:
        assert self.feed is not None and self.engine is not None
        reasons = health_reasons(self.config, self.feed.pool.status(), self.engine)
        return [not reasons, reasons]


def run(config: Config) -> int:
    import uvloop

    setup_logging(config.log_format, config.debug, config.environment)
    try:
        return uvloop.run(Supervisor(config).run())
    except (OSError, ConfigError) as exc:  # port in use; a Redis unfit for cluster mode
        log.error("cannot start: %s", exc)
        return 1


# -- a worker --------------------------------------------------------------------------------


class Worker:
    """One worker process: a picows server and a hub, fed by the local bus."""

    def __init__(self, config: Config, index: int, path: str, seats: NodeSeats) -> None:
        self.config = config
        self.index = index
        self.bus = LocalBus(path, index, on_lost=self._feed_lost)
        self.hub = Hub(self.bus, linger=config.unsubscribe_linger, history=history_of(config))
        self.bus.attach(self.hub)
        self.server = ProxyServer(
            config,
            self.hub,
            symbol_known=self.bus.symbol_known,
            health=self.health,
            stats=self.stats,
            metrics=metrics_renderer(self.stats),
            version=__version__,
            seats=seats,
        )
        self.exit_code = 0
        self._stop = asyncio.Event()

    def _feed_lost(self) -> None:
        self.exit_code = EXIT_FEED_LOST
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.bus.start()
        await self.bus.first_node.wait()  # /stats answers for the node from the first request
        await self.server.start()
        reporter = loop.create_task(self._report())
        log.info("worker listening", extra={"worker": self.index, "port": self.server.port})
        await self._stop.wait()
        reporter.cancel()
        try:
            await asyncio.wait_for(self._shutdown(), self.config.shutdown_timeout)
        except TimeoutError:
            log.warning("graceful stop took too long; exiting anyway")
        return self.exit_code

    async def _shutdown(self) -> None:
        await self.server.drain()
        self.hub.close()
        await self.bus.stop()
        await self.server.stop()

    async def _report(self) -> None:
        while True:
            self.bus.report(
                {
                    "worker": self.index,
                    "pid": os.getpid(),
                    "ready": self.server.ready,
                    "connections": self.server.stats(),
                    "hub": self.hub.stats(),
                }
            )
            await asyncio.sleep(REPORT_INTERVAL)

    def health(self) -> tuple[bool, dict[str, Any]]:
        node = self.bus.node or {}
        healthy, reasons = node.get("health", [False, ["no word from the feed process"]])
        reasons = list(reasons)
        age = asyncio.get_running_loop().time() - self.bus.node_at
        if age > NODE_STALE:
            healthy = False
            reasons.append(f"no word from the feed process for {age:.0f} s")
        body: dict[str, Any] = {
            "upstream": node.get("upstream", {}),
            "bus": node.get("bus", {}),
            "connections": node.get("totals", {}).get("connections", {}).get("connected", 0),
            "workers": node.get("supervisor", {}),
        }
        if reasons:
            body["reason"] = "; ".join(reasons)
        return healthy and not reasons, body

    def stats(self) -> dict[str, Any]:
        node = self.bus.node or {}
        totals = node.get("totals", {})
        connections = dict(totals.get("connections", {}))
        connections["max_clients"] = self.config.max_clients_total
        connections.setdefault("drops", {})
        hub = dict(totals.get("hub", {}))
        hub["streams"] = node.get("streams", 0)
        hub["streams_by_kind"] = node.get("streams_by_kind", {})
        workers = [
            {
                "id": report["worker"],
                "pid": report["pid"],
                "ready": report["ready"],
                "connected": report["connections"]["connected"],
                "subscriptions": report["hub"]["subscriptions"],
                "messages_sent": report["connections"]["messages_sent"],
            }
            for report in node.get("workers", {}).values()
        ]
        return {
            "uptime": round(time.time() - node.get("started_at", time.time()), 1),
            "worker": {"id": self.index, "pid": os.getpid()},
            "node": {
                **node.get("supervisor", {}),
                "as_of": node.get("at"),
            },
            "workers": workers,
            "connections": connections,
            "upstream": node.get("upstream", {}),
            "hub": hub,
            "pubsub": hub,  # the same figures under their first name, for existing readers
            "bus": node.get("bus", {}),
            "feed": node.get("feed", {}),
            "catalogue": node.get("catalogue", {}),
        }


def worker_main(config: Config, index: int, path: str, counts: Any, lock: Any) -> None:
    import uvloop

    setup_logging(config.log_format, config.debug, config.environment)
    seats = NodeSeats(counts, lock, index, config.max_clients_total)
    try:
        code = uvloop.run(Worker(config, index, path, seats).run())
    except OSError as exc:
        log.error("worker cannot start: %s", exc, extra={"worker": index})
        code = 1
    raise SystemExit(code)

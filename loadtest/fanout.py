"""The fan-out benchmark: the proxy against baselines, same scenario, same machine, same run.

    python -m loadtest.fanout --scenario S1 S2 --repeat 3
    python -m loadtest.fanout --scenario sweep --chart docs/perf.png

For each scenario and target (`proxy`; `proxy-uncompressed`, the proxy with COMPRESSION=off;
`relay`: the bare uvloop relay in relay.py; `crelay`: the syscall floor, a C relay doing one
write per delivery in crelay.c, built here with `cc`; `websockets`: the usual way, in
ws_baseline.py) it starts the Bybit simulator and the target as subprocesses, connects the
scenario's clients from a few worker processes (clients.py: picows, or `websockets` for the
compression scenario), waits until every client has its first message on every stream, lets it
run a short warm-up, and then measures a fixed window: deliveries/s, latency now - timestamp
(p50/p90/p99/max), lost messages (seq gaps), disconnects and drops, the target's CPU seconds
per delivery (utime+stime from /proc/<pid>/stat, and each apart), its write calls and bytes
written per delivery (/proc/<pid>/io) and its RSS per connection beyond the idle process.
Targets take turns within each repeat so background noise falls on all of them alike; the
summary takes medians. Results go to JSON and, with matplotlib installed, a PNG of latency and
throughput against load.

Every process it starts is stopped before it returns; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from loadtest.clients import HIST_BINS, WorkerSpec, bin_upper_ms, worker_main

# proxy-uncompressed: the proxy with COMPRESSION=off, the compression scenario's baseline;
# proxy-wN: the proxy with --workers N
TARGETS = (
    "proxy",
    "proxy-w2",
    "proxy-uncompressed",
    "relay",
    "crelay",
    "websockets",
    "websockets-uvloop",
)
DEFAULT_TARGETS = ("proxy", "relay", "crelay", "websockets")
# The simulator's default linear list; the first N serve an N-stream scenario.
SYMBOLS = [
    "BTCUSDT",
    "ETHUSDT",
    "SOLUSDT",
    "XRPUSDT",
    "DOGEUSDT",
    "BNBUSDT",
    "ADAUSDT",
    "AVAXUSDT",
    "LINKUSDT",
    "DOTUSDT",
    "LTCUSDT",
    "TRXUSDT",
    "SUIUSDT",
    "TONUSDT",
    "NEARUSDT",
    "APTUSDT",
    "ARBUSDT",
    "OPUSDT",
    "WIFUSDT",
    "AAVEUSDT",
]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class Scenario:
    name: str
    clients: int
    streams: int  # every client subscribes to the first `streams` tickers
    rate: float  # updates a second on each stream
    duration: float = 20.0  # the measured window, s
    warmup: float = 2.0
    connect_rate: float = 0.0  # total connects a second; 0: as fast as they complete
    workers: int = 2
    client: str = "picows"  # the load clients; "websockets" offers permessage-deflate
    slow: float = 0.0  # the share of clients that are slow readers (counted apart)
    kind: str = "ticker"  # the streams: ticker:SYMBOL, or e.g. orderbook:50 -> orderbook:50:SYMBOL
    targets: tuple[str, ...] = ()  # the servers it runs against unless --targets says; () = all
    note: str = ""

    @property
    def offered(self) -> float:
        return self.clients * self.streams * self.rate


SCENARIOS: dict[str, list[Scenario]] = {
    "S1": [Scenario("S1", 1000, 1, 40.0, note="1000 clients, one ticker at 40/s")],
    "S2": [Scenario("S2", 1000, 20, 10.0, note="1000 clients, each on 20 tickers at 10/s")],
    "S3": [Scenario("S3", 10_000, 1, 1.0, duration=15.0, note="10,000 clients, one ticker at 1/s")],
    "S4": [
        Scenario(
            "S4",
            5000,
            1,
            10.0,
            duration=5.0,
            connect_rate=1000.0,
            note="connect storm: 5,000 clients in 5 s, one ticker at 10/s",
        )
    ],
    "S7": [
        Scenario(
            "S7",
            200,
            1,
            50.0,
            client="websockets",
            targets=("proxy", "proxy-uncompressed"),
            note="compression: 200 websockets clients (offering deflate), one ticker at 50/s",
        )
    ],
    # Slow readers mixed in: the same S1 load without and with 10% of the clients reading less
    # than the stream sends; the healthy clients' figures should not move.
    "S8": [
        Scenario("S8-none", 1000, 1, 40.0, targets=("proxy",), note="S1, no slow readers"),
        Scenario("S8", 1000, 1, 40.0, slow=0.1, targets=("proxy",), note="10% slow readers"),
    ],
    "smoke": [Scenario("smoke", 20, 2, 20.0, duration=3.0, warmup=0.5, workers=1)],
    # Order books at Bybit's 20 ms cadence; proxy only (the baselines serve tickers alone).
    # 400 clients, not 1000: at 1000 (250,000 messages a second) the load clients themselves
    # saturate the 2 cores they share with the server (155,000/s delivered, latency growing,
    # the server at 0.28 of a core); --clients 1000 runs it anyway.
    "S5": [
        Scenario(
            "S5",
            400,
            5,
            50.0,
            kind="orderbook:50",
            targets=("proxy",),
            note="books: 400 clients x 5 orderbook:50 streams at 20 ms",
        )
    ],
    # Workers at saturation, S1 with twice the clients: run it with --targets proxy,proxy-w2
    # (one process against a supervisor with two workers) to see what the second core takes
    # and what the hop costs.
    "S6": [
        Scenario(
            "S6",
            2000,
            1,
            40.0,
            duration=10.0,
            targets=("proxy", "proxy-w2"),
            note="workers: S1 doubled, 2000 clients",
        )
    ],
    # Load against latency and throughput: 1000 clients on 1..20 tickers at 10/s.
    "sweep": [
        Scenario(f"sweep-{n}", 1000, n, 10.0, duration=10.0, note=f"1000 clients x {n} tickers")
        for n in (1, 2, 5, 10, 15, 20)
    ],
}
GOALS = {
    "S1": "nothing lost, p99 <= 25 ms, CPU/delivery <= 1.3x relay and <= 1/3 websockets",
    "S2": "nothing lost, p99 <= 50 ms",
    "S3": "all connected, nothing lost, RSS/connection <= 10 KiB",
    "S4": "all connected and subscribed, p99 connect-to-snapshot <= 1 s",
    "S5": "nothing lost, p99 <= 50 ms",
    "S6": "proxy-w2 delivers more than proxy at saturation, nothing lost",
    "S7": "bytes/delivery <= 0.65x proxy-uncompressed at <= 1.3x its CPU/delivery",
}


# -- processes -------------------------------------------------------------------------------


_CRELAY: dict[str, str] = {}


def crelay_binary() -> str:
    """loadtest/crelay.c compiled once per harness process into a temporary directory."""
    if "path" not in _CRELAY:
        import atexit
        import shutil
        import tempfile

        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("the crelay target needs a C compiler (cc)")
        tmp = tempfile.mkdtemp(prefix="crelay-")
        atexit.register(shutil.rmtree, tmp, True)
        binary = os.path.join(tmp, "crelay")
        source = Path(__file__).with_name("crelay.c")
        subprocess.run([cc, "-O2", "-o", binary, str(source)], check=True)
        _CRELAY["path"] = binary
    return _CRELAY["path"]


def _crelay_options(target: str) -> list[str]:
    """`crelay-gap3000` spins 3000 ns between writes, `crelay-touch64` touches 64 KiB."""
    options = []
    for part in target.split("-")[1:]:
        if part.startswith("gap") and part[3:].isdigit():
            options += ["--gap-ns", part[3:]]
        elif part.startswith("touch") and part[5:].isdigit():
            options += ["--touch-kib", part[5:]]
        else:
            raise ValueError(f"unknown crelay option {part!r} (gapNS, touchKIB)")
    return options


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, s: user space and kernel apart."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def io_counts(pid: int) -> dict[str, int]:
    """/proc/<pid>/io: syscw (write-family syscalls) and wchar (bytes they were given)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return {k: int(v) for k, v in (line.split(": ") for line in f)}
    except OSError:  # another user's process, or no task I/O accounting
        return {}


_SLAB_CACHES = ("TCP", "sock_inode_cache")  # a tcp_sock and its socket inode, per connection


def slab_bytes_per_socket() -> int:
    """What every TCP socket costs the kernel before any buffer: its slab objects' sizes."""
    total = 0
    with contextlib.suppress(OSError), open("/proc/slabinfo") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] in _SLAB_CACHES:
                total += int(fields[3])
    return total


def socket_buffers(port: int) -> tuple[int, int]:
    """(sockets, bytes) of the server's established sockets on `port`, from `ss -tm`: receive
    and send buffers in use, forward allocations and option memory (skmem r, t, w, f, o)."""
    try:
        out = subprocess.run(
            ["ss", "-tmnH", "state", "established", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0, 0
    sockets = used = 0
    for line in out.splitlines():
        start = line.find("skmem:(")
        if start < 0:
            continue
        sockets += 1
        fields = line[start + 7 : line.index(")", start)].split(",")
        values = {
            f.rstrip("0123456789"): int(f.lstrip("abcdefghijklmnopqrstuvwxyz")) for f in fields
        }
        used += sum(values.get(k, 0) for k in ("r", "t", "w", "f", "o"))
    return sockets, used


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_KIB


def process_tree(pid: int) -> list[int]:
    """`pid` and every process under it (a proxy with workers is a supervisor and children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", "rb") as f:
                    todo += [int(child) for child in f.read().split()]
    return found


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each process of the tree under `pid`."""
    seconds = {}
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            seconds[member] = cpu_seconds(member)
    return seconds


def tree_split(pid: int) -> dict[int, tuple[float, float]]:
    """(utime, stime) of each process of the tree under `pid`."""
    split = {}
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            split[member] = cpu_split(member)
    return split


def tree_io(pid: int) -> dict[int, dict[str, int]]:
    return {member: io_counts(member) for member in process_tree(pid)}


def tree_rss_kib(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += rss_kib(member)
    return total


def proxy_workers(target: str) -> int:
    """`proxy-wN` runs the proxy with `--workers N`; plain `proxy` is one process."""
    label = target.partition("=")[0]
    _, _, count = label.rpartition("-w")
    return int(count) if label.startswith("proxy-w") and count.isdigit() else 1


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        time.sleep(0.1)
    raise RuntimeError(f"proxy on {port} not ready after {timeout} s")


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Stack:
    """The simulator and one target, as subprocesses that stop with the `with` block."""

    def __init__(self, scenario: Scenario, target: str, logs: Path) -> None:
        self.scenario = scenario
        self.target = target
        self.logs = logs
        self.sim: subprocess.Popen[bytes] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._files: list[Any] = []

    def _spawn(self, name: str, argv: list[str], cwd: str | None = None) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in __exit__
        self._files.append(log)
        env = dict(os.environ)
        if cwd:
            env["PYTHONPATH"] = cwd
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env
        )

    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.__exit__()  # a sim that started must not outlive a server that did not
            raise
        return self

    def _start(self) -> None:
        scenario = self.scenario
        symbols = ",".join(SYMBOLS[: scenario.streams])
        sim_port, self.port = free_port(), free_port()
        py = sys.executable
        self.sim = self._spawn(
            "sim",
            [
                *(py, "-m", "fastproxy.sim", "--host", "127.0.0.1", "--port", str(sim_port)),
                *("--symbols", symbols, "--ticker-interval", str(1.0 / scenario.rate)),
                # the ticker changes at most once a market step: faster rates need shorter steps
                *("--market-interval", str(min(0.02, 1.0 / scenario.rate))),
                *("--log-level", "WARNING"),
            ],
        )
        _wait_port(sim_port, self.sim, 30)
        upstream = f"ws://127.0.0.1:{sim_port}/v5/public/linear"
        common = ["--host", "127.0.0.1", "--port", str(self.port), "--upstream", upstream]
        cwd = None
        if self.target.startswith("proxy"):
            # proxy=TREE: the proxy from another source tree, for an A/B of two versions
            _, _, tree = self.target.partition("=")
            cwd = tree or None
            argv = [py, "-m", "fastproxy", "--host", "127.0.0.1", "--port", str(self.port)]
            argv += ["--bybit-ws-url", upstream, "--bybit-rest-url", f"http://127.0.0.1:{sim_port}"]
            argv += ["--max-clients-total", str(scenario.clients + 1000), "--log-format", "text"]
            argv += ["--workers", str(proxy_workers(self.target))]
            if self.target.partition("=")[0] == "proxy-uncompressed":
                argv += ["--compression", "off"]
        elif self.target == "relay":
            argv = [py, "-m", "loadtest.relay", *common, "--symbols", symbols]
        elif self.target.startswith("crelay"):
            argv = [crelay_binary(), "--port", str(self.port), "--upstream-port", str(sim_port)]
            argv += ["--symbols", symbols, *_crelay_options(self.target)]
        elif self.target in ("websockets", "websockets-uvloop"):
            argv = [py, "-m", "loadtest.ws_baseline", *common, "--symbols", symbols]
            argv += ["--loop", "uvloop" if self.target.endswith("uvloop") else "asyncio"]
        else:
            raise ValueError(f"unknown target {self.target!r}")
        self.server = self._spawn(self.target.partition("=")[0], argv, cwd)
        if self.target.startswith("proxy"):
            _wait_ready(self.port, self.server, 30)
        else:
            _wait_port(self.port, self.server, 30)

    def __exit__(self, *exc: object) -> None:
        _stop(self.server)
        _stop(self.sim)
        for f in self._files:
            f.close()


# -- one run ---------------------------------------------------------------------------------


def percentile(hist: list[int], total: int, q: float) -> float:
    """Upper edge of the bin holding the q-quantile, in ms."""
    if total == 0:
        return float("nan")
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank and n:
            return round(bin_upper_ms(i), 1)
    return round(bin_upper_ms(HIST_BINS), 1)


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    values = sorted(values)

    def pick(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))], 1)

    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(values[-1], 1)}


def _proxy_drops(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
            stats = json.loads(r.read())
    except OSError:
        return None
    return sum(stats["connections"]["drops"].values())


def _py_spy(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes] | None:
    """Sample the target during the window (collapsed stacks with native frames; sampling pauses it
    briefly, so a profiled run's own numbers are a little worse)."""
    import shutil

    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        print("py-spy is not installed: no profile (pip install py-spy)", file=sys.stderr)
        return None
    argv = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250"]
    argv += ["--format", "raw", "--native", "--output", str(output)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _perf_record(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes] | None:
    """`perf record` of the target (kernel and user, call graphs) during the window."""
    import shutil

    exe = shutil.which("perf")
    if exe is None:
        print(
            "perf is not installed: no kernel profile (apt-get install linux-perf)", file=sys.stderr
        )
        return None
    argv = [exe, "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid)]
    argv += ["-o", str(output), "--", "sleep", str(int(seconds))]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_once(
    scenario: Scenario, target: str, logs: Path, profile: bool = False, perf: bool = False
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    label = target.partition("=")[0]
    result: dict[str, Any] = {
        "scenario": scenario.name,
        "target": label,
        "clients": scenario.clients,
        "streams": scenario.streams,
        "rate": scenario.rate,
        "offered_per_s": scenario.offered,
        "loadavg_start": os.getloadavg()[0],
    }
    streams = [f"{scenario.kind}:{s}" for s in SYMBOLS[: scenario.streams]]
    with Stack(scenario, target, logs / f"{scenario.name}-{label}") as stack:
        assert stack.server is not None and stack.sim is not None
        url = f"ws://127.0.0.1:{stack.port}/ws"
        time.sleep(0.5)
        pid = stack.server.pid
        rss_idle = tree_rss_kib(pid)
        workers: list[tuple[Any, Connection]] = []
        per_worker = [
            scenario.clients // scenario.workers
            + (1 if i < scenario.clients % scenario.workers else 0)
            for i in range(scenario.workers)
        ]
        ready_timeout = 30.0 + scenario.clients / 200.0
        told = False
        try:
            for share in per_worker:
                spec = WorkerSpec(
                    url=url,
                    clients=share,
                    streams=streams,
                    connect_rate=scenario.connect_rate / scenario.workers,
                    ready_timeout=ready_timeout,
                    client=scenario.client,
                    slow=round(share * scenario.slow),
                )
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
                proc.start()
                child.close()
                workers.append((proc, parent))
            ready = [_recv(conn, ready_timeout + 60) for _, conn in workers]
            result["connected"] = sum(r["connected"] for r in ready)
            result["subscribed"] = sum(r["subscribed"] for r in ready)
            result["connect_failed"] = sum(r["failed"] for r in ready)
            result["connect_to_snapshot_ms"] = _quantiles(
                [ms for r in ready for ms in r["connect_ms"]]
            )
            rss_loaded = tree_rss_kib(pid)
            t0 = time.time() + scenario.warmup
            t1 = t0 + scenario.duration
            for _, conn in workers:
                conn.send(("measure", t0, t1))
            told = True
            time.sleep(max(0.0, t0 - time.time()))
            pids = {"server": pid, "sim": stack.sim.pid}
            pids.update({f"client{i}": proc.pid for i, (proc, _) in enumerate(workers)})
            cpu0 = {name: cpu_seconds(p) for name, p in pids.items()}
            server0, split0, io0 = tree_cpu(pid), tree_split(pid), tree_io(pid)
            spy = None
            if profile:
                output = logs / f"{scenario.name}-{label}" / "py-spy.txt"
                spy = _py_spy(pid, scenario.duration - 1, output)
                result["profile"] = str(output)
            elif perf:
                output = logs / f"{scenario.name}-{label}" / "perf.data"
                spy = _perf_record(pid, scenario.duration - 1, output)
                result["perf"] = str(output)
            time.sleep(max(0.0, t1 - time.time()))
            cpu1 = {name: cpu_seconds(p) for name, p in pids.items()}
            server1, split1, io1 = tree_cpu(pid), tree_split(pid), tree_io(pid)
            rss_end = tree_rss_kib(pid)
            kernel_sockets, kernel_buffers = socket_buffers(stack.port)
            finals = [_recv(conn, 60) for _, conn in workers]
            if spy is not None:
                spy.wait(30)
                if perf and spy.returncode == 0:
                    from loadtest.perfsplit import split

                    with contextlib.suppress(OSError, subprocess.CalledProcessError):
                        result["perf_split"] = split(result["perf"])
        finally:
            for proc, conn in workers:
                if not told:  # failed before the window: let the workers close and exit
                    with contextlib.suppress(OSError, ValueError):
                        conn.send(("stop",))
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
                conn.close()
        if target.startswith("proxy"):
            result["server_drops"] = _proxy_drops(stack.port)
    window = scenario.duration
    hist = [0] * (HIST_BINS + 1)
    for final in finals:
        for i, n in enumerate(final["hist"]):
            if n:
                hist[i] += n
    count = sum(f["count"] for f in finals)
    # the whole process tree: a proxy with workers is a supervisor, its workers and helpers
    server_cpu = sum(server1[p] - server0[p] for p in server1 if p in server0)
    user_s = sum(split1[p][0] - split0[p][0] for p in split1 if p in split0)
    kernel_s = sum(split1[p][1] - split0[p][1] for p in split1 if p in split0)
    writes = sum(io1[p].get("syscw", 0) - io0[p].get("syscw", 0) for p in io1 if p in io0)
    written = sum(io1[p].get("wchar", 0) - io0[p].get("wchar", 0) for p in io1 if p in io0)
    spans = [hi - lo + 1 for f in finals for lo, hi in f["spans"].values()]
    result.update(
        {
            "deliveries": count,
            "deliveries_per_s": round(count / window),
            "upstream_rate": round(statistics.median(spans) / window, 1) if spans else 0.0,
            "latency_ms": {
                "p50": percentile(hist, count, 0.50),
                "p90": percentile(hist, count, 0.90),
                "p99": percentile(hist, count, 0.99),
                "max": round(max((f["max_ms"] for f in finals), default=0.0), 1),
            },
            "lost": sum(f["lost"] for f in finals),
            "slow_clients": sum(f["slow"]["clients"] for f in finals),
            "slow_deliveries": sum(f["slow"]["count"] for f in finals),
            "slow_skipped": sum(f["slow"]["lost"] for f in finals),
            "slow_disconnects": sum(f["slow"]["disconnects"] for f in finals),
            "duplicates": sum(f["dup"] for f in finals),
            "disconnects": sum(f["disconnects"] for f in finals),
            "connected_at_end": sum(f["connected_at_end"] for f in finals),
            "server_cpu_s": round(server_cpu, 2),
            "server_cpu_util": round(server_cpu / window, 3),
            # the supervisor first, then its workers (one entry for a single-process server)
            "server_cpu_util_by_process": [
                round((server1[p] - server0[p]) / window, 3) for p in server1 if p in server0
            ],
            "cpu_us_per_delivery": round(server_cpu / count * 1e6, 3) if count else None,
            "user_us_per_delivery": round(user_s / count * 1e6, 3) if count else None,
            "kernel_us_per_delivery": round(kernel_s / count * 1e6, 3) if count else None,
            # write-family syscalls and the bytes they carried (the server's log lines too)
            "writes_per_delivery": round(writes / count, 3) if count and writes else None,
            "bytes_per_delivery": round(written / count, 1) if count and writes else None,
            "kernel_us_per_write": round(kernel_s / writes * 1e6, 3) if writes else None,
            "sim_cpu_util": round((cpu1["sim"] - cpu0["sim"]) / window, 3),
            "clients_cpu_util": round(
                sum(cpu1[k] - cpu0[k] for k in cpu0 if k.startswith("client")) / window, 3
            ),
            "rss_idle_kib": rss_idle,
            "rss_loaded_kib": max(rss_loaded, rss_end),
            "rss_per_conn_kib": round(
                (max(rss_loaded, rss_end) - rss_idle) / result["connected"], 2
            )
            if result["connected"]
            else None,
            # the kernel's share per connection: the socket's slab objects and the buffers it
            # holds at the window's end (ss -tm), beside the process's RSS above
            "kernel_kib_per_conn": round(
                (slab_bytes_per_socket() + kernel_buffers / kernel_sockets) / 1024, 2
            )
            if kernel_sockets
            else None,
            "kernel_buffers_kib_per_conn": round(kernel_buffers / kernel_sockets / 1024, 2)
            if kernel_sockets
            else None,
            "errors": sorted({e for r in [*ready, *finals] for e in r["errors"]})[:10],
            "loadavg_end": os.getloadavg()[0],
        }
    )
    return result


def _recv(conn: Connection, timeout: float) -> Any:
    try:
        if conn.poll(timeout):
            return conn.recv()
    except EOFError:
        raise RuntimeError("a client worker died; see its traceback above") from None
    raise RuntimeError(f"a client worker did not report within {timeout:.0f} s")


# -- summary, table, chart -------------------------------------------------------------------

_MEDIAN_KEYS = (
    "deliveries_per_s",
    "upstream_rate",
    "cpu_us_per_delivery",
    "user_us_per_delivery",
    "kernel_us_per_delivery",
    "writes_per_delivery",
    "bytes_per_delivery",
    "kernel_us_per_write",
    "server_cpu_util",
    "rss_per_conn_kib",
    "kernel_kib_per_conn",
    "clients_cpu_util",
)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over the repeats of each (scenario, target); worst case for counts of failures."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["scenario"], run["target"]), []).append(run)
    rows = []
    for (scenario, target), group in groups.items():
        row: dict[str, Any] = {
            "scenario": scenario,
            "target": target,
            "repeats": len(group),
            "clients": group[0]["clients"],
            "offered_per_s": group[0]["offered_per_s"],
        }
        for key in _MEDIAN_KEYS:
            values = [g[key] for g in group if g.get(key) is not None]
            row[key] = round(statistics.median(values), 3) if values else None
        for key in ("p50", "p90", "p99", "max"):
            row[f"latency_{key}_ms"] = statistics.median(g["latency_ms"][key] for g in group)
        for key in ("p50", "p99", "max"):
            row[f"connect_{key}_ms"] = statistics.median(
                g["connect_to_snapshot_ms"][key] for g in group
            )
        for key in ("lost", "duplicates", "disconnects", "connect_failed"):
            row[key] = max(g[key] for g in group)
        row["connected_min"] = min(g["connected"] for g in group)
        row["subscribed_min"] = min(g["subscribed"] for g in group)
        row["server_drops"] = max((g.get("server_drops") or 0) for g in group)
        rows.append(row)
    by_key = {(r["scenario"], r["target"]): r for r in rows}
    for row in rows:
        if row["target"] != "proxy" or not row["cpu_us_per_delivery"]:
            continue
        for base in ("relay", "crelay", "websockets", "websockets-uvloop", "proxy-uncompressed"):
            other = by_key.get((row["scenario"], base))
            if other and other["cpu_us_per_delivery"]:
                row[f"cpu_vs_{base}"] = round(
                    row["cpu_us_per_delivery"] / other["cpu_us_per_delivery"], 2
                )
                if row.get("bytes_per_delivery") and other.get("bytes_per_delivery"):
                    row[f"bytes_vs_{base}"] = round(
                        row["bytes_per_delivery"] / other["bytes_per_delivery"], 3
                    )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'scenario':<9} {'target':<10} {'clients':>7} {'deliv/s':>8} {'p50':>6} {'p90':>6} "
        f"{'p99':>7} {'max':>7} {'lost':>5} {'disc':>5} {'CPU us/d':>8} {'core':>5} "
        f"{'KiB/conn':>8} {'conn p99':>8} {'vs relay':>8} {'vs C':>6} {'vs ws':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:

        def num(value: Any, width: int, fmt: str = ".1f") -> str:
            return f"{value:>{width}{fmt}}" if isinstance(value, int | float) else f"{'-':>{width}}"

        lines.append(
            f"{r['scenario']:<9} {r['target']:<10} {r['clients']:>7} "
            f"{num(r['deliveries_per_s'], 8, '.0f')} {num(r['latency_p50_ms'], 6)} "
            f"{num(r['latency_p90_ms'], 6)} {num(r['latency_p99_ms'], 7)} "
            f"{num(r['latency_max_ms'], 7)} {r['lost']:>5} {r['disconnects']:>5} "
            f"{num(r['cpu_us_per_delivery'], 8, '.2f')} {num(r['server_cpu_util'], 5, '.2f')} "
            f"{num(r['rss_per_conn_kib'], 8)} {num(r['connect_p99_ms'], 8, '.0f')} "
            f"{num(r.get('cpu_vs_relay'), 8, '.2f')} {num(r.get('cpu_vs_crelay'), 6, '.2f')} "
            f"{num(r.get('cpu_vs_websockets'), 6, '.2f')}"
        )
    return "\n".join(lines)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table, the README's layout."""

    def num(value: Any, fmt: str = ",.0f") -> str:
        return format(value, fmt) if isinstance(value, int | float) else "-"

    lines = [
        "| scenario | server | clients | delivered/s | latency p50 / p99 / max, ms | lost "
        "| CPU µs per delivery (user + kernel) | writes per delivery | bytes per delivery "
        "| RSS + kernel KiB per connection | connect p99, ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = num(r["cpu_us_per_delivery"], ".2f")
        if r.get("user_us_per_delivery") is not None:
            cpu += (
                f" ({num(r['user_us_per_delivery'], '.2f')} + "
                f"{num(r['kernel_us_per_delivery'], '.2f')})"
            )
        latency = " / ".join(num(r[f"latency_{k}_ms"], ",.1f") for k in ("p50", "p99", "max"))
        lines.append(
            f"| {r['scenario']} | {r['target']} | {num(r['clients'])} "
            f"| {num(r['deliveries_per_s'])} | {latency} | {r['lost']} | {cpu} "
            f"| {num(r.get('writes_per_delivery'), '.2f')} "
            f"| {num(r.get('bytes_per_delivery'), ',.0f')} "
            f"| {num(r['rss_per_conn_kib'], '.1f')} + {num(r.get('kernel_kib_per_conn'), '.1f')} "
            f"| {num(r['connect_p99_ms'])} |"
        )
    return "\n".join(lines)


def draw_chart(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -e '.[load]')", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = {
        "proxy": "tab:blue",
        "relay": "tab:green",
        "crelay": "tab:grey",
        "websockets": "tab:red",
        "websockets-uvloop": "tab:orange",
    }
    for target in dict.fromkeys(r["target"] for r in rows):
        points = sorted(
            (r for r in rows if r["target"] == target), key=lambda r: r["offered_per_s"]
        )
        if not points:
            continue
        x = [r["offered_per_s"] / 1000 for r in points]
        color = colors.get(target)
        style = {"marker": "o", "color": color, "label": target}
        axes[0].plot(x, [r["deliveries_per_s"] / 1000 for r in points], **style)
        axes[1].plot(x, [r["latency_p99_ms"] for r in points], **style)
        axes[1].plot(x, [r["latency_p50_ms"] for r in points], linestyle=":", color=color)
        axes[2].plot(x, [r["cpu_us_per_delivery"] or float("nan") for r in points], **style)
    top = max((r["offered_per_s"] for r in rows), default=1) / 1000
    axes[0].plot([0, top], [0, top], linestyle="--", color="grey", label="offered")
    axes[0].set_title("delivered vs offered (k msg/s)")
    axes[1].set_title("latency p99 (solid), p50 (dotted), ms")
    axes[1].set_yscale("log")
    axes[2].set_title("server CPU per delivery, µs")
    for ax in axes:
        ax.set_xlabel("offered load, k deliveries/s")
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


# -- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.fanout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenario",
        nargs="+",
        default=["S1"],
        help=f"any of {', '.join(SCENARIOS)}, or all (S1-S8)",
    )
    parser.add_argument(
        "--targets",
        help="comma-separated (default: each scenario's own, else "
        f"{','.join(DEFAULT_TARGETS)}); NAME=TREE (NAME starting with proxy) runs the proxy from "
        "another source tree, to compare two versions in one run",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; medians reported")
    parser.add_argument("--clients", type=int, help="override the scenario's client count")
    parser.add_argument("--duration", type=float, help="override the measured window, s")
    parser.add_argument("--workers", type=int, help="client processes (default: scenario's)")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    parser.add_argument("--json", type=Path, help="results file (default: under --out)")
    parser.add_argument("--chart", type=Path, help="PNG file (default: under --out)")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument("--markdown", type=Path, help="also write the summary as a Markdown table")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the target during each window"
    )
    parser.add_argument(
        "--perf", action="store_true", help="perf record the target during each window"
    )
    args = parser.parse_args(argv)

    every = ["S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8"]
    names = every if args.scenario == ["all"] else args.scenario
    scenarios: list[Scenario] = []
    for name in names:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
        for scenario in SCENARIOS[name]:
            if args.clients:
                scenario = replace(scenario, clients=args.clients)
            if args.duration:
                scenario = replace(scenario, duration=args.duration)
            if args.workers:
                scenario = replace(scenario, workers=args.workers)
            scenarios.append(scenario)
    chosen = [t.strip() for t in (args.targets or "").split(",") if t.strip()]
    for scenario in scenarios:
        scenario.targets = tuple(chosen or scenario.targets or DEFAULT_TARGETS)
    for target in {t for s in scenarios for t in s.targets}:
        if target.startswith("crelay-"):
            try:
                _crelay_options(target)
            except ValueError as exc:
                parser.error(str(exc))
        elif target not in TARGETS and not (
            target.startswith("proxy") and ("=" in target or proxy_workers(target) > 1)
        ):
            parser.error(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    fd_limit = raise_fd_limit()
    if max(s.clients for s in scenarios) + 100 > fd_limit:
        print(f"warning: the open-file limit is {fd_limit}", file=sys.stderr)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = args.out / f"logs-{stamp}"
    runs: list[dict[str, Any]] = []
    for scenario in scenarios:
        for repeat in range(args.repeat):
            for target in scenario.targets:
                print(f"[{scenario.name} {target} run {repeat + 1}/{args.repeat}]", flush=True)
                try:
                    result = run_once(scenario, target, logs, args.profile, args.perf)
                except RuntimeError as exc:
                    print(f"  failed: {exc}", flush=True)
                    continue
                result["repeat"] = repeat + 1
                runs.append(result)
                lat = result["latency_ms"]
                print(
                    f"  {result['deliveries_per_s']}/s p50 {lat['p50']} p99 {lat['p99']} "
                    f"max {lat['max']} ms, lost {result['lost']}, "
                    f"{result['cpu_us_per_delivery']} us CPU/delivery, "
                    f"{result['rss_per_conn_kib']} KiB/conn, "
                    f"connected {result['connected']}/{scenario.clients}, "
                    f"connect p99 {result['connect_to_snapshot_ms']['p99']} ms, "
                    f"load {result['loadavg_end']:.2f}",
                    flush=True,
                )
    rows = summarize(runs)
    print()
    print(format_table(rows))
    report = {
        "machine": machine(),
        "command": " ".join(["python -m loadtest.fanout", *(argv or sys.argv[1:])]),
        "scenarios": [asdict(s) for s in scenarios],
        "goals": GOALS,
        "summary": rows,
        "runs": runs,
    }
    json_path = args.json or args.out / f"fanout-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.write_text(format_markdown(rows) + "\n")
    print(f"\nresults: {json_path}")
    if not args.no_chart and rows:
        chart = args.chart or args.out / f"fanout-{stamp}.png"
        what = ", ".join(names)
        if names == ["sweep"]:
            what = "1000 clients, each on N tickers at 10 updates/s, N = 1..20"
        title = f"fastproxy fan-out: {what} ({os.cpu_count()} cores, loopback)"
        if draw_chart(rows, chart, title):
            print(f"chart: {chart}")
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main())

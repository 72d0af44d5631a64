"""Smoke runs of the load tools: they start, drive traffic, count it and stop by themselves.

Nothing here checks a timing: these only guard the harness and the locustfile against rot.
The real figures come from `python -m loadtest.fanout` (README, Performance).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.test_cli import start_demo, wait_ready

ROOT = Path(__file__).resolve().parent.parent


def test_fanout_harness_runs_against_the_proxy_and_the_baselines(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "loadtest.fanout", "--scenario", "smoke"),
            *("--targets", "proxy,relay,crelay,websockets", "--out", str(tmp_path)),
            *("--json", str(out), "--no-chart"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    runs = {run["target"]: run for run in report["runs"]}
    assert set(runs) == {"proxy", "relay", "crelay", "websockets"}, result.stdout
    for target, run in runs.items():
        assert run["connected"] == run["clients"] == 20, (target, run)
        assert run["subscribed"] == 20, (target, run)
        assert run["deliveries"] > 0, (target, run)
        assert run["lost"] == 0 and run["duplicates"] == 0, (target, run)
        assert run["cpu_us_per_delivery"] is not None, (target, run)
    assert {row["target"] for row in report["summary"]} == set(runs)


def run_fanout(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "loadtest.fanout", *args),
            *("--out", str(tmp_path), "--json", str(out), "--no-chart"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())


def test_compression_scenario_counts_bytes_with_websockets_clients(tmp_path: Path) -> None:
    report = run_fanout(
        tmp_path,
        *("--scenario", "S7", "--targets", "proxy,proxy-uncompressed"),
        *("--clients", "10", "--duration", "2", "--workers", "1"),
    )
    runs = {run["target"]: run for run in report["runs"]}
    assert set(runs) == {"proxy", "proxy-uncompressed"}
    for target, run in runs.items():
        assert run["connected"] == run["subscribed"] == 10, (target, run)
        assert run["deliveries"] > 0 and run["lost"] == 0, (target, run)
        assert run["bytes_per_delivery"] and run["writes_per_delivery"], (target, run)
    # the same messages, compressed: fewer bytes written per delivery (not a timing)
    assert runs["proxy"]["bytes_per_delivery"] < runs["proxy-uncompressed"]["bytes_per_delivery"]


def test_books_scenario_delivers_every_book_update(tmp_path: Path) -> None:
    report = run_fanout(
        tmp_path,
        *("--scenario", "S5", "--targets", "proxy"),
        *("--clients", "10", "--duration", "2", "--workers", "1"),
    )
    (run,) = report["runs"]
    assert run["connected"] == run["subscribed"] == 10, run
    assert run["streams"] == 5 and run["deliveries"] > 0, run
    assert run["lost"] == 0 and run["duplicates"] == 0, run


def test_workers_scenario_runs_one_process_against_two_workers(tmp_path: Path) -> None:
    report = run_fanout(
        tmp_path,
        *("--scenario", "S6", "--targets", "proxy,proxy-w2"),
        *("--clients", "20", "--duration", "2", "--workers", "1"),
    )
    runs = {run["target"]: run for run in report["runs"]}
    assert set(runs) == {"proxy", "proxy-w2"}
    for target, run in runs.items():
        assert run["connected"] == run["subscribed"] == 20, (target, run)
        assert run["deliveries"] > 0 and run["lost"] == 0, (target, run)
    # a supervisor, its feed and two workers are counted, not the supervisor alone
    assert len(runs["proxy-w2"]["server_cpu_util_by_process"]) >= 3, runs["proxy-w2"]


def test_slow_readers_scenario_counts_them_apart(tmp_path: Path) -> None:
    report = run_fanout(
        tmp_path,
        *("--scenario", "S8", "--targets", "proxy"),
        *("--clients", "20", "--duration", "2", "--workers", "1"),
    )
    runs = {run["scenario"]: run for run in report["runs"]}
    assert set(runs) == {"S8-none", "S8"}
    for name, run in runs.items():
        assert run["connected"] == run["subscribed"] == 20, (name, run)
        assert run["deliveries"] > 0 and run["lost"] == 0, (name, run)
    assert runs["S8-none"]["slow_clients"] == 0
    assert runs["S8"]["slow_clients"] == 2
    # the slow readers take less than the stream sends: fewer deliveries each than the healthy
    healthy_each = runs["S8"]["deliveries"] / 18
    assert runs["S8"]["slow_deliveries"] / 2 < healthy_each, runs["S8"]


@pytest.mark.skipif(
    importlib.util.find_spec("locust") is None,
    reason="locust is not installed (pip install -e '.[load]')",
)
def test_locustfile_streams_from_a_demo_proxy(tmp_path: Path) -> None:
    port = free_port()
    proxy = start_demo(port)
    try:
        wait_ready(port, proxy)
        prefix = tmp_path / "locust"
        # locust is run as its own process: importing it here would let gevent patch the
        # sockets of the whole test session.
        result = subprocess.run(
            [
                *(sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py")),
                *("--headless", "-u", "20", "-r", "20", "-t", "5s", "--only-summary"),
                *("--host", f"ws://127.0.0.1:{port}", "--csv", str(prefix)),
                *("--streams", "ticker:BTCUSDT,ticker:ETHUSDT", "--ping-interval", "1"),
                *("--stop-timeout", "2"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        proxy.terminate()
        proxy.wait(15)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["connect"]["Request Count"]) == 20, rows
    assert int(rows["connect"]["Failure Count"]) == 0, rows
    assert int(rows["subscribe"]["Request Count"]) == 20, rows
    for stream in ("mudrex.futures.ticker.BTCUSDT", "mudrex.futures.ticker.ETHUSDT"):
        assert int(rows[stream]["Request Count"]) > 20, rows
        assert int(rows[stream]["Failure Count"]) == 0, rows
    assert int(rows["ping"]["Request Count"]) > 0, rows
    assert "seq gap" not in rows, rows

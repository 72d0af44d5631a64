"""Shared test setup: a reachable Redis for the whole run, and the opt-in slow marker.

Redis: FASTPROXY_TEST_REDIS_URL if set, else 127.0.0.1:6379 if it answers, else a private
`redis-server` on a free port that this run starts and stops. Without any of these the run
stops at once with a message saying what to install.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

_redis_process: subprocess.Popen[bytes] | None = None
_redis_dir: tempfile.TemporaryDirectory[str] | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", default=False, help="run soak and load tests too"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (make soak)")
    for item in items:
        # the marker, not item.keywords: those also hold the path's parts (a checkout in .../slow)
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def pytest_configure(config: pytest.Config) -> None:
    global _redis_process, _redis_dir
    if os.environ.get("FASTPROXY_TEST_REDIS_URL"):
        return
    if _redis_answers("127.0.0.1", 6379):
        os.environ["FASTPROXY_TEST_REDIS_URL"] = "redis://127.0.0.1:6379/0"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.exit(
            "The tests need Redis: none answers on 127.0.0.1:6379 and there is no redis-server "
            "binary to start one. Install it (Debian/Ubuntu: apt-get install redis-server) or "
            "set FASTPROXY_TEST_REDIS_URL.",
            returncode=3,
        )
    port = free_port()
    _redis_dir = tempfile.TemporaryDirectory(prefix="fastproxy-redis-")
    _redis_process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            _redis_dir.name,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not _redis_answers("127.0.0.1", port):
        if time.monotonic() > deadline or _redis_process.poll() is not None:
            pytest.exit(f"Started redis-server on port {port} but it did not answer", returncode=3)
        time.sleep(0.05)
    os.environ["FASTPROXY_TEST_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _redis_process is not None:
        _redis_process.terminate()
        try:
            _redis_process.wait(5)
        except subprocess.TimeoutExpired:
            _redis_process.kill()
    if _redis_dir is not None:
        _redis_dir.cleanup()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return os.environ["FASTPROXY_TEST_REDIS_URL"]

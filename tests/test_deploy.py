"""The README's Deploy section, step by step, without Docker (these machines run no Docker engine).

Fast, in every run: .env.example is complete and current; railway.toml, the compose file and
prometheus.yml agree with each other and with the proxy; the container's entrypoint, settings and
health check work as the image runs them; the compose topology (Redis, two nodes, the scrape
targets) works as processes. Slow (--run-slow): the image's build steps (`pip wheel .`, install
the wheels into a fresh venv, run it) and `make demo` in a fresh copy, which installs no test tools.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import connect

from fastproxy.config import SETTINGS, env_example
from tests.conftest import free_port
from tests.proxyutil import http_get, recv_data, running_proxy, running_sim, subscribe
from tests.test_cluster import unique_url
from tests.test_cluster_bus import delete_prefix

ROOT = Path(__file__).resolve().parent.parent
TICKER = "mudrex.futures.ticker.BTCUSDT"


def test_env_example_lists_every_setting_with_its_default() -> None:
    text = (ROOT / ".env.example").read_text()
    assert text == env_example(), ".env.example is stale: run `make env-example`"
    for setting in SETTINGS:
        assert f"\n#{setting.env}={setting.default}\n" in text, setting.env


def test_railway_builds_the_dockerfile_and_checks_ready() -> None:
    railway = tomllib.loads((ROOT / "railway.toml").read_text())
    assert railway["deploy"]["healthcheckPath"] == "/ready"
    assert (ROOT / railway["build"]["dockerfilePath"]).is_file()


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def image_env() -> dict[str, str]:
    line = re.search(r"^ENV (.+)$", dockerfile(), re.M)
    assert line is not None
    return dict(pair.split("=", 1) for pair in line.group(1).split())


def healthcheck_command() -> list[str]:
    line = re.search(r"^HEALTHCHECK .*CMD (\[.+\])$", dockerfile(), re.M)
    assert line is not None
    return json.loads(line.group(1))


def test_compose_and_prometheus_agree() -> None:
    compose = (ROOT / "deploy" / "docker-compose.yml").read_text()
    prometheus = (ROOT / "deploy" / "prometheus.yml").read_text()
    for service in ("redis:", "node1:", "node2:", "prometheus:"):
        assert f"\n  {service}\n" in compose, service
    assert "REDIS_URL: redis://redis:6379/0" in compose
    assert "context: .." in compose and "dockerfile: Dockerfile" in compose
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml" in compose
    # the nodes listen on the image's PORT; Prometheus scrapes both there, at /metrics
    port = image_env()["PORT"]
    assert f'targets: ["node1:{port}", "node2:{port}"]' in prometheus
    assert "metrics_path: /metrics" in prometheus
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for name in (
        "fastproxy_exchange_lag_seconds_bucket",
        "fastproxy_residence_seconds_bucket",
        "fastproxy_stale_streams",
        "fastproxy_book_resyncs_total",
    ):
        assert name in exprs


def grafana_metric_names() -> set[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    return set(re.findall(r"\b((?:fastproxy|process)_[a-z0-9_]+)\{", exprs))


async def test_every_metric_the_grafana_dashboard_queries_is_served() -> None:
    """A renamed metric would leave a panel silently empty: each one the dashboard queries
    is in a real node's /metrics (per-key ones appear once a keyed client has connected, which
    the access tests cover)."""
    names = {name for name in grafana_metric_names() if not name.startswith("fastproxy_key_")}
    assert {"fastproxy_stale_streams", "fastproxy_book_resyncs_total"} <= names
    async with running_sim() as sim, running_proxy(sim) as app:
        status, body = await asyncio.to_thread(http_get, app, "/metrics")
    assert status == 200
    text = body.decode()
    served = set(re.findall(r"^([a-z_0-9]+)[ {]", text, re.M))
    # a labelled family with no sample yet (no drop so far) is still declared
    suffix = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for name, kind in re.findall(r"^# TYPE ([a-z_0-9]+) (\w+)$", text, re.M):
        served.update(name + end for end in suffix.get(kind, ("",)))
    # families that have no sample before their first event on a lone node (a drop, a refusal,
    # an owner change in a cluster): declared by the collector all the same
    after_an_event = {
        "fastproxy_client_drops_total",
        "fastproxy_client_disconnects_total",
        "fastproxy_client_refused_total",
        "fastproxy_bus_leases_won_total",
        "fastproxy_bus_leases_lost_total",
    }
    collector = (ROOT / "fastproxy" / "metrics.py").read_text()
    for name in after_an_event:
        base = name.removeprefix("fastproxy_bus_").removeprefix("fastproxy_").removesuffix("_total")
        assert f'"{base}"' in collector or f'"fastproxy_{base}"' in collector, name
    assert names - served - after_an_event == set()


@asynccontextmanager
async def node(env: dict[str, str], *args: str) -> AsyncIterator[int]:
    """`fastproxy ARGS` as a container runs it: the image's ENV, then the given settings."""
    port = free_port()
    full = {**os.environ, **image_env(), **env, "PORT": str(port), "HOST": "127.0.0.1"}
    full.pop("FASTPROXY_TEST_REDIS_URL", None)
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("fastproxy")), *args],
            env=full,
            stdout=log,
            stderr=log,
        )
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            command = [sys.executable, *healthcheck_command()[1:]]  # `python` of the image
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise AssertionError(log.read().decode())
                result = await asyncio.to_thread(
                    subprocess.run, command, env=full, capture_output=True
                )
                if result.returncode == 0:
                    break
                assert loop.time() < deadline, "the image's health check never passed"
                await asyncio.sleep(0.3)
            yield port
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read()


async def test_container_entrypoint_with_env_example_and_health_check(tmp_path: Path) -> None:
    """`cp .env.example .env` and `docker run --env-file .env fastproxy --demo`, as processes:
    every line of .env.example is a comment, so the defaults apply."""
    env = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    assert env == {}
    async with node(env, "--demo") as port:
        assert healthcheck_command()[:3] == ["python", "-m", "fastproxy.healthcheck"]
        status, body = await asyncio.to_thread(get, port, "/dashboard")
        assert status == 200 and b"<title>fastproxy dashboard</title>" in body


async def test_compose_topology_as_processes(redis_url: str) -> None:
    """deploy/docker-compose.yml without Docker: one Redis (the tests' own, a fresh key
    prefix), the simulator as the upstream (its offline profile), two nodes, both scraped."""
    url = unique_url(redis_url)
    try:
        async with running_sim() as sim:
            env = {
                "REDIS_URL": url,
                "ENVIRONMENT": "compose",
                "BYBIT_WS_URL": sim.ws_url("linear"),
                "BYBIT_REST_URL": sim.http_url,
            }
            async with node(env) as port1, node(env) as port2:
                async with (
                    connect(f"ws://127.0.0.1:{port1}/ws") as one,
                    connect(f"ws://127.0.0.1:{port2}/ws") as two,
                ):
                    await subscribe(one, "ticker:BTCUSDT")
                    await subscribe(two, "ticker:BTCUSDT")
                    first, second = await recv_data(one, TICKER), await recv_data(two, TICKER)
                    assert first["type"] == second["type"] == "snapshot"
                    for port in (port1, port2):  # what prometheus.yml scrapes
                        status, text = await asyncio.to_thread(get, port, "/metrics")
                        assert status == 200 and b"fastproxy_bus_healthy 1.0" in text
                    assert sim.subscription_counts().get("tickers.BTCUSDT") == 1  # one owner
                    _, body = await asyncio.to_thread(get, port1, "/health")
                    assert orjson.loads(body)["status"] == "healthy"
    finally:
        await delete_prefix(redis_url, url.split("prefix=", 1)[1])


def _copy_of_repository(target: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            (target / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name.decode())
    return target


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_image_build_steps_without_docker(tmp_path: Path) -> None:
    """The Dockerfile's build stage (`pip wheel .`) and run stage (install the wheels into a
    clean environment, run the entrypoint, the health check passes, the dashboard ships)."""
    source = _copy_of_repository(tmp_path / "src")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), "."],
        cwd=source,
        check=True,
    )
    ours = next(wheels.glob("fastproxy-*.whl"))
    with zipfile.ZipFile(ours) as wheel:
        names = wheel.namelist()
    assert "fastproxy/dashboard/index.html" in names
    assert any("/_codec." in n and n.endswith(".so") for n in names), names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *map(str, wheels.glob("*.whl"))], check=True)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        check=True,
    ).stdout
    names_installed = {p["name"].lower() for p in json.loads(installed)}
    assert not names_installed & {"pytest", "ruff", "locust", "cython"}
    port = free_port()
    env = {**os.environ, **image_env(), "PORT": str(port), "HOST": "127.0.0.1"}
    process = subprocess.Popen([str(venv / "bin" / "fastproxy"), "--demo"], env=env, cwd=tmp_path)
    try:
        for _ in range(120):
            check = subprocess.run(
                [str(venv / "bin" / "python"), "-m", "fastproxy.healthcheck"],
                env=env,
                capture_output=True,
                cwd=tmp_path,
            )
            if check.returncode == 0:
                break
            await asyncio.sleep(0.5)
        assert check.returncode == 0, check.stderr
        status, body = await asyncio.to_thread(get, port, "/dashboard")
        assert status == 200 and b"fastproxy dashboard" in body
    finally:
        process.terminate()
        process.wait(15)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_make_demo_in_a_fresh_copy_installs_no_test_tools(tmp_path: Path) -> None:
    source = _copy_of_repository(tmp_path / "src")
    port = free_port()
    (source / ".env").write_text(f"PORT={port}\nHOST=127.0.0.1\n")  # cp .env.example .env; edit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PORT"))}
    process = subprocess.Popen(["make", "demo"], cwd=source, env=env, start_new_session=True)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 540
        while True:
            try:
                status, _ = await asyncio.to_thread(get, port, "/ready")
                if status == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, "make demo exited"
            assert loop.time() < deadline, "make demo never became ready"
            await asyncio.sleep(1)
        assert not (source / ".venv" / "bin" / "pytest").exists()
        assert not (source / ".venv" / "bin" / "ruff").exists()
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await subscribe(ws, "ticker:BTCUSDT")
            assert (await recv_data(ws, TICKER))["type"] == "snapshot"
    finally:
        os.killpg(process.pid, 15)
        process.wait(30)


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


@pytest.mark.parametrize("document", ["README.md", "docs/protocol.md"])
def test_docs_link_only_what_is_in_the_repository(document: str) -> None:
    path = ROOT / document
    text = path.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        assert not re.match(r"[a-z]+:", link), f"{document} links outside the repository: {link}"
        target, _, anchor = link.partition("#")
        if target:
            assert (path.parent / target).exists(), f"{document}: {link} is not in the repository"
        if anchor:
            doc = (path.parent / target).read_text() if target else text
            assert anchor in _anchors(doc), f"{document}: no heading for #{anchor}"
    assert ".." not in " ".join(re.findall(r"`([^`]*\.md)`", text)), "a path outside the repo"

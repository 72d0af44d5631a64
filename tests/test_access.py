"""Access control, each option accepting and refusing: API keys (inline, file, SIGHUP reload),
the /stats and /metrics token, per-address limits behind trusted proxies, origins, TLS."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from fastproxy.access import (
    AddressLimit,
    ClientAddress,
    KeyFileError,
    KeyRing,
    key_id,
    origin_allowed,
    request_token,
)
from fastproxy.config import ConfigError, load
from tests.conftest import free_port
from tests.proxyutil import recv_data, running_proxy, running_sim, subscribe

TICKER = "mudrex.futures.ticker.BTCUSDT"
KEY_A = "alpha-secret-0123456789"
KEY_B = "bravo-secret-9876543210"

# -- sans-I/O pieces -------------------------------------------------------------------------


def test_request_token_from_header_or_query() -> None:
    assert request_token("Bearer abc", b"") == "abc"
    assert request_token("bearer  abc ", b"") == "abc"
    assert request_token(None, b"tickers=X&token=a%2Bb") == "a+b"
    assert request_token("Basic Zm9v", b"") is None
    assert request_token("Bearer ", b"token=") is None
    assert request_token("Bearer h", b"token=q") == "h"  # the header wins


def test_key_ring_inline_file_and_reload(tmp_path: Path) -> None:
    assert not KeyRing().enabled and KeyRing().check("x") is None
    path = tmp_path / "keys"
    path.write_text(f"# team keys\n{KEY_B}  # bots\n\n")
    ring = KeyRing([KEY_A], str(path))
    assert ring.check(KEY_A) == key_id(KEY_A) and ring.check(KEY_B) == key_id(KEY_B)
    assert ring.check("bravo") is None and ring.check("") is None and ring.check(None) is None
    assert len(key_id(KEY_A)) == 8 and KEY_A not in key_id(KEY_A)
    path.write_text("charlie\n")
    assert ring.reload() == sorted([key_id(KEY_A), key_id("charlie")])
    assert ring.check(KEY_B) is None
    path.unlink()
    with pytest.raises(KeyFileError) as error:
        ring.reload()
    assert "charlie" not in str(error.value)
    assert ring.check("charlie") == key_id("charlie")  # a failed reload keeps the old keys


def test_forwarded_for_only_from_trusted_peers() -> None:
    plain = ClientAddress()
    assert plain.resolve("10.0.0.9", "1.2.3.4") == "10.0.0.9"
    lb = ClientAddress(["10.0.0.0/8", "127.0.0.1/32"])
    assert lb.resolve("10.0.0.9", "1.2.3.4") == "1.2.3.4"
    assert lb.resolve("192.0.2.1", "1.2.3.4") == "192.0.2.1"  # not a trusted peer
    # a client's own header is ahead of what the balancer appended: the rightmost untrusted wins
    assert lb.resolve("10.0.0.9", "6.6.6.6, 1.2.3.4, 10.0.0.7") == "1.2.3.4"
    assert lb.resolve("10.0.0.9", "not-an-ip") == "10.0.0.9"
    assert lb.resolve("::ffff:10.0.0.9", "1.2.3.4") == "1.2.3.4"
    assert lb.resolve("10.0.0.9", None) == "10.0.0.9"


def test_address_limit_and_origins() -> None:
    limit = AddressLimit(2)
    limit.add("a")
    assert not limit.full("a")
    limit.add("a")
    assert limit.full("a") and not limit.full("b")
    limit.remove("a")
    assert not limit.full("a")
    assert not AddressLimit(0).full("a")
    allowed = ("https://app.example.com",)
    assert origin_allowed(None, allowed)  # not a browser
    assert origin_allowed("https://APP.example.com", allowed)
    assert not origin_allowed("https://evil.example.com", allowed)
    assert origin_allowed("https://evil.example.com", ())
    assert origin_allowed("https://evil.example.com", ("*",))


def test_access_settings_are_checked_and_secrets_never_shown() -> None:
    config = load(environ={"API_KEYS": f" {KEY_A}, {KEY_B} ", "METRICS_TOKEN": "m-secret"})
    assert config.api_keys == (KEY_A, KEY_B)
    assert KEY_A not in repr(config) and "m-secret" not in repr(config)
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        load(environ={"TRUSTED_PROXIES": "10.0.0.0/8,nonsense"})
    with pytest.raises(ConfigError, match="ALLOWED_ORIGINS"):
        load(environ={"ALLOWED_ORIGINS": "app.example.com"})
    with pytest.raises(ConfigError, match="TLS_CERT and TLS_KEY"):
        load(environ={"TLS_CERT": __file__})
    with pytest.raises(ConfigError, match="API_KEYS_FILE"):
        load(environ={"API_KEYS_FILE": "/nonexistent/keys"})
    with pytest.raises(ConfigError, match="MAX_CONNECTIONS_PER_IP"):
        load(environ={"MAX_CONNECTIONS_PER_IP": "-1"})


# -- over the real server --------------------------------------------------------------------


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    return await asyncio.to_thread(_get, port, path, headers)


async def refused_status(url: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, **kwargs):
            pass
    return refused.value.response.status_code


async def test_api_keys_on_ws_header_or_query_401_otherwise() -> None:
    async with running_sim() as sim, running_proxy(sim, api_keys=(KEY_A, KEY_B)) as app:
        base = f"ws://127.0.0.1:{app.port}/ws"
        assert await refused_status(base) == 401
        assert await refused_status(base + "?token=wrong") == 401
        assert await refused_status(base, additional_headers={"Authorization": "Bearer no"}) == 401
        async with connect(base, additional_headers={"Authorization": f"Bearer {KEY_A}"}) as ws:
            await subscribe(ws, "ticker:BTCUSDT")
            await recv_data(ws, TICKER)
        async with connect(f"{base}?token={KEY_B}") as ws:
            await subscribe(ws, "ticker:BTCUSDT")
            await recv_data(ws, TICKER)
            # /health and /ready stay open; /stats and /metrics take an API key
            assert (await get(app.port, "/health"))[0] == 200
            assert (await get(app.port, "/ready"))[0] == 200
            assert (await get(app.port, "/dashboard"))[0] == 200
            status, body = await get(app.port, "/stats")
            assert status == 401 and orjson.loads(body)["error"] == "unauthorized"
            assert (await get(app.port, "/metrics"))[0] == 401
            status, body = await get(app.port, f"/stats?token={KEY_A}")
            assert status == 200
            stats = orjson.loads(body)["connections"]
            assert stats["refused"] == {"unauthorized": 3}
            usage = stats["keys"]
            assert set(usage) == {key_id(KEY_A), key_id(KEY_B)}
            assert usage[key_id(KEY_A)]["connections"] == 1
            assert usage[key_id(KEY_A)]["clients"] == 0
            assert usage[key_id(KEY_B)]["clients"] == 1
            assert usage[key_id(KEY_B)]["messages_sent"] >= 2  # the ack and a ticker
            assert KEY_A not in body.decode() and KEY_B not in body.decode()
            headers = {"Authorization": f"Bearer {KEY_B}"}
            status, text = await get(app.port, "/metrics", headers)
            assert status == 200
            assert f'fastproxy_key_clients{{key_id="{key_id(KEY_B)}"}} 1.0' in text.decode()


async def test_metrics_token_guards_stats_and_metrics_on_its_own() -> None:
    async with running_sim() as sim, running_proxy(sim, metrics_token="scrape-me") as app:
        assert (await get(app.port, "/metrics"))[0] == 401
        assert (await get(app.port, "/stats?token=nope"))[0] == 401
        status, _ = await get(app.port, "/metrics", {"Authorization": "Bearer scrape-me"})
        assert status == 200
        assert (await get(app.port, "/stats?token=scrape-me"))[0] == 200
        # no API keys: /ws stays open
        async with connect(f"ws://127.0.0.1:{app.port}/ws") as ws:
            await subscribe(ws, "ticker:BTCUSDT")
    options = {"api_keys": (KEY_A,), "metrics_token": "scrape-me"}
    async with running_sim() as sim, running_proxy(sim, **options) as app:
        # with its own token set, an API key does not open /metrics
        assert (await get(app.port, f"/metrics?token={KEY_A}"))[0] == 401
        assert (await get(app.port, "/metrics?token=scrape-me"))[0] == 200


async def test_max_connections_per_ip_429_and_forwarded_for_from_trusted_proxies() -> None:
    async with running_sim() as sim, running_proxy(sim, max_connections_per_ip=2) as app:
        url = f"ws://127.0.0.1:{app.port}/ws"
        async with connect(url) as one, connect(url) as two:
            assert await refused_status(url) == 429
            # not a trusted proxy: its X-Forwarded-For is ignored
            spoof = {"X-Forwarded-For": "198.51.100.7"}
            assert await refused_status(url, additional_headers=spoof) == 429
            await one.close()
            await asyncio.sleep(0.2)
            async with connect(url) as three:  # a place came free
                await subscribe(three, "ticker:BTCUSDT")
            del two
        _, body = await get(app.port, "/stats")
        assert orjson.loads(body)["connections"]["refused"] == {"address_limit": 2}
    options = {"max_connections_per_ip": 1, "trusted_proxies": ("127.0.0.0/8",)}
    async with running_sim() as sim, running_proxy(sim, **options) as app:
        url = f"ws://127.0.0.1:{app.port}/ws"

        def via(address: str) -> dict[str, Any]:
            return {"additional_headers": {"X-Forwarded-For": f"{address}, 127.0.0.1"}}

        async with connect(url, **via("198.51.100.7")), connect(url, **via("198.51.100.8")):
            assert await refused_status(url, **via("198.51.100.7")) == 429
            async with connect(url):  # the balancer's own address is one more client
                assert await refused_status(url) == 429


async def test_allowed_origins_403_for_other_browsers() -> None:
    options = {"allowed_origins": ("https://app.example.com",)}
    async with running_sim() as sim, running_proxy(sim, **options) as app:
        url = f"ws://127.0.0.1:{app.port}/ws"
        assert await refused_status(url, origin="https://evil.example.com") == 403
        async with connect(url, origin="https://app.example.com") as ws:
            await subscribe(ws, "ticker:BTCUSDT")
        async with connect(url) as ws:  # no Origin: not a browser, not refused
            await subscribe(ws, "ticker:BTCUSDT")


def make_certificate(directory: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the TLS test makes its certificate with the openssl command; none here")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_serves_wss_and_https(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    options = {"tls_cert": str(cert), "tls_key": str(key)}
    async with running_sim() as sim, running_proxy(sim, **options) as app:
        trust = ssl.create_default_context(cafile=str(cert))
        async with connect(f"wss://127.0.0.1:{app.port}/ws", ssl=trust) as ws:
            assert (await subscribe(ws, "ticker:BTCUSDT"))["success"] is True
            assert (await recv_data(ws, TICKER))["type"] == "snapshot"

        def https(path: str) -> int:
            url = f"https://127.0.0.1:{app.port}{path}"
            with urllib.request.urlopen(url, timeout=10, context=trust) as response:
                return response.status

        assert await asyncio.to_thread(https, "/ready") == 200
        # refused: a client that does not trust the certificate, and plain ws:// on the TLS port
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(f"wss://127.0.0.1:{app.port}/ws", ssl=ssl.create_default_context()):
                pass
        with pytest.raises((InvalidHandshake, OSError, TimeoutError)):
            async with connect(f"ws://127.0.0.1:{app.port}/ws", open_timeout=5):
                pass


# -- a real process: the key file re-read on SIGHUP, keys never in the logs ------------------


async def test_api_keys_file_reloaded_on_sighup_and_keys_never_logged(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY_A}\n")
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "API_KEYS_FILE": str(keys),
        "LOG_FORMAT": "json",
        "DEBUG": "true",  # the most the proxy ever logs
    }
    log_path = tmp_path / "proxy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fastproxy", "--demo"], env=env, stdout=log, stderr=log
        )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not await _ready(port):
            assert process.poll() is None, log_path.read_text()
            assert loop.time() < deadline, "proxy never became ready"
            await asyncio.sleep(0.2)
        base = f"ws://127.0.0.1:{port}/ws"
        assert await refused_status(f"{base}?token={KEY_B}") == 401
        async with connect(f"{base}?token={KEY_A}") as holder:
            await subscribe(holder, "ticker:BTCUSDT")
            keys.write_text(f"# rotated\n{KEY_B}\n")
            process.send_signal(signal.SIGHUP)
            # the removed key's client is closed with 4001; the new key is accepted
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(holder.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
        async with connect(f"{base}?token={KEY_B}") as ws:
            await subscribe(ws, "ticker:BTCUSDT")
        assert await refused_status(f"{base}?token={KEY_A}") == 401
        _, body = await get(port, f"/stats?token={KEY_B}")
        assert orjson.loads(body)["connections"]["disconnects"].get("key_revoked") == 1
    finally:
        process.terminate()
        process.wait(15)
    text = log_path.read_text()
    assert "API keys reloaded" in text and key_id(KEY_B) in text
    assert KEY_A not in text and KEY_B not in text


async def _ready(port: int) -> bool:
    try:
        return (await get(port, "/ready"))[0] == 200
    except OSError:  # not listening yet
        return False

"""GET /dashboard: the page as served, and the page running in real headless Chromium against a
real proxy fed by the simulator (prices appear and change; book resyncs and stale streams move
when the simulator sends a crossed book and then goes silent; a screenshot is kept).

The Chromium test needs Debian's `chromium` (`apt-get install chromium`; `.ci/run` installs it).
Where there is none it skips and says so. The screenshot goes to $FASTPROXY_ARTIFACTS_DIR when
set, else to the test's tmp dir; its path is printed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from fastproxy.dashboard import page
from tests.proxyutil import client, http_get, running_proxy, running_sim, subscribe

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
    "--remote-debugging-port=0",
)


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_page_is_package_data_with_nothing_external() -> None:
    html = page().decode()
    assert html.startswith("<!doctype html>")
    # no external assets: nothing fetched from another host, no src/href to anything but itself
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#)""", html)
    assert not re.search(r"https?://", html)
    assert "new WebSocket(" in html and "/stats" in html and "/health" in html


async def test_dashboard_route_serves_the_page_with_a_strict_policy() -> None:
    async with running_sim() as sim, running_proxy(sim) as app:

        def get() -> tuple[int, dict[str, str], bytes]:
            url = f"http://127.0.0.1:{app.port}/dashboard?tickers=BTCUSDT"
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, dict(response.headers), response.read()

        status, headers, body = await asyncio.to_thread(get)
        assert status == 200
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert body == page()


class DevTools:
    """The smallest Chrome DevTools Protocol client: one page target, commands in order."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        await self.ws.send(orjson.dumps({"id": ident, "method": method, "params": params}).decode())
        while True:
            message = orjson.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if message.get("id") == ident:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


# What the ticker table shows: symbol -> (price, seq), read from the page's DOM.
READ_TABLE = """JSON.stringify(Array.from(document.querySelectorAll('#tickers tr')).map(tr => [
  tr.dataset.symbol,
  tr.querySelector('[data-field=price]').textContent,
  tr.querySelector('[data-field=seq]').textContent]))"""


def artifacts_dir(tmp_path: Path) -> Path:
    configured = os.environ.get("FASTPROXY_ARTIFACTS_DIR")
    path = Path(configured) if configured else tmp_path
    path.mkdir(parents=True, exist_ok=True)
    return path


async def test_dashboard_in_headless_chromium(tmp_path: Path) -> None:
    binary = chromium()
    if binary is None:
        pytest.skip(
            "no Chromium on this machine: install Debian's chromium (apt-get install chromium); "
            ".ci/run does so when it is missing"
        )
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    async with running_sim(ticker_interval=0.1) as sim, running_proxy(sim) as app:
        browser = await asyncio.create_subprocess_exec(
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            port_file = profile / "DevToolsActivePort"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not (port_file.exists() and port_file.read_text().strip()):
                assert browser.returncode is None, "chromium exited at start"
                assert loop.time() < deadline, "chromium never opened its DevTools port"
                await asyncio.sleep(0.1)
            devtools_port = int(port_file.read_text().split()[0])

            def targets() -> list[dict[str, Any]]:
                url = f"http://127.0.0.1:{devtools_port}/json/list"
                with urllib.request.urlopen(url, timeout=10) as response:
                    return orjson.loads(response.read())

            pages = [t for t in await asyncio.to_thread(targets) if t["url"] == "about:blank"]
            async with connect(pages[0]["webSocketDebuggerUrl"], max_size=2**26) as ws:
                tools = DevTools(ws)
                await tools.call("Page.enable")
                url = f"http://127.0.0.1:{app.port}/dashboard?tickers=BTCUSDT,ETHUSDT"
                await tools.call("Page.navigate", url=url)

                async def table() -> dict[str, tuple[str, str]]:
                    rows = orjson.loads(await tools.evaluate(READ_TABLE) or "[]")
                    return {symbol: (price, seq) for symbol, price, seq in rows}

                # prices appear: both rows hold a number that came over /ws
                deadline = loop.time() + 30
                while True:
                    first = await table()
                    if set(first) == {"BTCUSDT", "ETHUSDT"} and all(
                        re.fullmatch(r"\d+(\.\d+)?", price) for price, _ in first.values()
                    ):
                        break
                    assert loop.time() < deadline, f"no prices on the page: {first}"
                    await asyncio.sleep(0.2)
                # ... and change: the simulator's random walk moves them
                deadline = loop.time() + 30
                while True:
                    now = await table()
                    if all(now[s][1] != first[s][1] for s in now) and any(
                        now[s][0] != first[s][0] for s in now
                    ):
                        break
                    assert loop.time() < deadline, f"prices never changed: {first} -> {now}"
                    await asyncio.sleep(0.2)
                # the operator panels are filled from /health and /stats
                deadline = loop.time() + 15
                while True:
                    health = await tools.evaluate("document.getElementById('health').textContent")
                    clients = await tools.evaluate("document.getElementById('clients').textContent")
                    rate = await tools.evaluate("document.getElementById('msgs-rate').textContent")
                    if health == "healthy" and clients == "1" and rate not in ("\u2013", "0"):
                        break
                    assert loop.time() < deadline, (health, clients, rate)
                    await asyncio.sleep(0.2)
                assert await tools.evaluate("document.getElementById('error').textContent") == ""

                async def text(element: str) -> str:
                    return await tools.evaluate(f"document.getElementById('{element}').textContent")

                async def until(element: str, wanted: Any, seconds: float) -> str:
                    deadline = loop.time() + seconds
                    while not wanted(shown := await text(element)):
                        assert loop.time() < deadline, (element, shown)
                        await asyncio.sleep(0.2)
                    return shown

                # nothing stale, no resync yet: both boxes read the node's real fields
                await until("stale", lambda shown: shown == "0", 15)
                await until("resyncs", lambda shown: shown == "0", 15)
                # a crossed book on the exchange: the proxy rebuilds it, the box counts it
                async with client(app) as book_client:
                    await subscribe(book_client, "orderbook:50:BTCUSDT")
                    await asyncio.sleep(0.5)  # the book's first snapshot is in
                    sim.crossed_delta("orderbook.50.BTCUSDT")
                    await until("resyncs", lambda shown: shown not in ("0", "\u2013"), 15)
                    assert "crossed" in await text("resync-reasons")
                await asyncio.sleep(1.5)  # the book is released (linger 0.5 s)
                # the exchange goes silent: the page's two tickers turn stale
                sim.set_half_dead(True)
                await until("stale", lambda shown: shown == "2", 15)
                detail = await text("stale-detail")
                assert re.fullmatch(r"[1-9]\d* upstream topics stale", detail), detail
                shot = await tools.call("Page.captureScreenshot", format="png")
                sim.clear_faults()
            import base64

            path = artifacts_dir(tmp_path) / "dashboard.png"
            path.write_bytes(base64.b64decode(shot["data"]))
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            print(f"dashboard screenshot: {path}")
            # the page is a client like any other: the proxy saw its subscription
            status, body = await asyncio.to_thread(http_get, app, "/stats")
            stats = orjson.loads(body)
            hub = stats.get("hub") or stats["pubsub"]
            assert status == 200 and hub["subscriptions_by_kind"]["ticker"] == 2
        finally:
            if browser.returncode is None:
                browser.terminate()
                try:
                    await asyncio.wait_for(browser.wait(), 10)
                except TimeoutError:
                    browser.kill()
                    await browser.wait()

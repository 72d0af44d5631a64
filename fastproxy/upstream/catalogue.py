"""The list of tradable symbols, from Bybit's REST instruments-info, refreshed periodically.

It lets the server refuse an unknown symbol at once instead of waiting for the exchange's
`handler not found`. When the list cannot be fetched, `check` answers None ("don't know") and the
proxy falls back to syntax checks and upstream refusals; a later failure keeps the last good list.
Nothing waits for it: the first fetch runs in the background like every refresh, so a proxy
whose exchange does not answer still listens at once and serves with the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

import orjson

log = logging.getLogger("fastproxy.upstream.catalogue")

_REST_HOSTS = {
    "stream.bybit.com": "https://api.bybit.com",
    "stream-testnet.bybit.com": "https://api-testnet.bybit.com",
}


def default_rest_url(ws_url: str) -> str:
    """The REST base that serves the symbol list for a Bybit WebSocket URL.

    Bybit's own stream hosts map to their API hosts; any other host (the simulator, a relay) is
    assumed to serve REST itself on the same host and port.
    """
    parts = urllib.parse.urlsplit(ws_url)
    host = (parts.hostname or "").lower()
    if host in _REST_HOSTS:
        return _REST_HOSTS[host]
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
    return f"{scheme}://{parts.netloc}"


class CatalogueError(Exception):
    pass


def fetch_symbols(
    rest_url: str,
    category: str = "linear",
    *,
    timeout: float = 10.0,
    page_limit: int = 1000,
    max_pages: int = 50,
) -> set[str]:
    """All symbols of `category`, following `nextPageCursor` (blocking; run it in a thread)."""
    symbols: set[str] = set()
    cursor = ""
    seen_cursors: set[str] = set()
    base = rest_url.rstrip("/") + "/v5/market/instruments-info"
    for _ in range(max_pages):
        query = {"category": category, "limit": str(page_limit)}
        if cursor:
            query["cursor"] = cursor
        url = f"{base}?{urllib.parse.urlencode(query)}"
        request = urllib.request.Request(url, headers={"User-Agent": "fastproxy"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        try:
            reply = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise CatalogueError(f"instruments-info: not JSON ({exc})") from None
        if not isinstance(reply, dict) or reply.get("retCode") != 0:
            message = reply.get("retMsg") if isinstance(reply, dict) else None
            raise CatalogueError(f"instruments-info refused: {message!r}")
        result = reply.get("result") or {}
        rows = result.get("list")
        if not isinstance(rows, list):
            raise CatalogueError("instruments-info: no result.list")
        for row in rows:
            if not isinstance(row, dict):
                continue
            symbol = row.get("symbol")
            # A closed contract no longer streams; anything else (trading, pre-launch,
            # delivering) is a symbol the exchange knows.
            if isinstance(symbol, str) and symbol and row.get("status") != "Closed":
                symbols.add(symbol)
        cursor = result.get("nextPageCursor") or ""
        if not isinstance(cursor, str) or not cursor:
            break
        if cursor in seen_cursors:
            raise CatalogueError("instruments-info: paging cursor repeats")
        seen_cursors.add(cursor)
    else:
        raise CatalogueError(f"instruments-info: more than {max_pages} pages")
    if not symbols:
        raise CatalogueError("instruments-info: empty symbol list")
    return symbols


async def _in_daemon_thread(function: Any, *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` in a daemon thread. Not the loop's default executor: a fetch
    stuck until its timeout would hold up the process's exit (the executor's threads are joined
    at shutdown); a daemon thread is simply left behind."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return  # cancelled meanwhile
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = function(*args, **kwargs), None
        except BaseException as exc:  # handed to the awaiting task, which decides
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="fastproxy-catalogue-fetch", daemon=True).start()
    return await future


class SymbolCatalogue:
    def __init__(
        self,
        rest_url: str,
        *,
        category: str = "linear",
        refresh_interval: float = 600.0,
        retry_interval: float = 30.0,
        timeout: float = 10.0,
        page_limit: int = 1000,
    ) -> None:
        self.rest_url = rest_url
        self.page_limit = page_limit
        self.category = category
        self.refresh_interval = refresh_interval
        # Without a list validation is weaker, so a failed fetch is retried sooner.
        self.retry_interval = min(retry_interval, refresh_interval)
        self.timeout = timeout
        self._symbols: frozenset[str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_success_mono: float | None = None
        self.last_error: str | None = None
        self.fetches = 0
        self.failures = 0
        self._attempted = asyncio.Event()  # set when the first fetch has succeeded or failed

    @property
    def symbols(self) -> frozenset[str] | None:
        return self._symbols

    def check(self, symbol: str) -> bool | None:
        """True/False when the list is known; None when it is not (fall back to other checks)."""
        symbols = self._symbols
        if symbols is None:
            return None
        return symbol in symbols

    async def start(self) -> None:
        """Start fetching in the background and return at once; `wait_first_attempt` waits."""
        if self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._refresh_loop(), name="fastproxy-symbol-catalogue"
        )

    async def wait_first_attempt(self, timeout: float | None = None) -> bool:
        """Wait until the first fetch has succeeded or failed; True if the list is known."""
        await asyncio.wait_for(self._attempted.wait(), timeout)
        return self._symbols is not None

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def refresh(self) -> bool:
        self.fetches += 1
        try:
            symbols = await _in_daemon_thread(
                fetch_symbols,
                self.rest_url,
                self.category,
                timeout=self.timeout,
                page_limit=self.page_limit,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            fallback = (
                "keeping the last good list"
                if self._symbols is not None
                else "symbol validation falls back to syntax checks and upstream refusals"
            )
            log.warning(
                "symbol list fetch failed; %s",
                fallback,
                extra={"url": self.rest_url, "error": self.last_error},
            )
            return False
        if self._symbols is None or len(symbols) != len(self._symbols):
            log.info("symbol list loaded", extra={"symbols": len(symbols), "url": self.rest_url})
        self._symbols = frozenset(symbols)
        self._last_success_mono = time.monotonic()
        self.last_error = None
        return True

    async def _refresh_loop(self) -> None:
        try:
            ok = await self.refresh()
        finally:
            self._attempted.set()
        while True:
            await asyncio.sleep(self.refresh_interval if ok else self.retry_interval)
            ok = await self.refresh()

    def status(self) -> dict[str, Any]:
        age = None
        if self._last_success_mono is not None:
            age = round(time.monotonic() - self._last_success_mono, 1)
        return {
            "known": self._symbols is not None,
            "symbols": 0 if self._symbols is None else len(self._symbols),
            "age": age,
            "last_error": self.last_error,
            "fetches": self.fetches,
            "failures": self.failures,
            "url": self.rest_url,
        }

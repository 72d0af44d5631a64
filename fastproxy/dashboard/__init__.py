"""The operator's page served at GET /dashboard: one static HTML file, no build step, nothing
loaded from elsewhere. It reads /health and /stats once a second and watches a few tickers
over /ws like any client (`?tickers=BTCUSDT,ETHUSDT`; `?token=` when API keys are set)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def page() -> bytes:
    return files(__package__).joinpath("index.html").read_bytes()

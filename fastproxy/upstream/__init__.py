"""Bybit V5 public WebSocket client side: the connection pool and the symbol catalogue.

The protocol and placement logic (`bybit_protocol`, `plan`, `policy`) is sans-I/O; `connection`
and `pool` are the asyncio/picows shell around it.
"""

from fastproxy.upstream.catalogue import SymbolCatalogue, default_rest_url
from fastproxy.upstream.pool import UpstreamPool
from fastproxy.upstream.settings import UpstreamSettings

__all__ = ["SymbolCatalogue", "UpstreamPool", "UpstreamSettings", "default_rest_url"]

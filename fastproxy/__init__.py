"""fastproxy: Bybit V5 public market data served as Mudrex-branded WebSocket streams."""

__version__ = "0.1.0"

"""Bybit V5 public WebSocket simulator: a fake exchange for testing the proxy offline.

``Simulator(SimConfig(...))`` serves ``/v5/public/{linear,inverse,spot,option}`` plus the REST
instruments list and a fault-injection control API on one port.
"""

from fastproxy.sim.config import SimConfig
from fastproxy.sim.server import Simulator

__all__ = ["SimConfig", "Simulator"]

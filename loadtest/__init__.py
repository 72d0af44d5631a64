"""Load tests: the locust user (locustfile.py) and the fan-out benchmark (`python -m
loadtest.fanout`) with its two baselines (relay.py, ws_baseline.py)."""

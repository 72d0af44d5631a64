"""Cluster mode: the bus on Redis (one server or a Redis Cluster), one concern a module.

- `shell`: the engine, `RedisBus` (tasks, pipelines, pub/sub connections, reconnects);
- `options`: the engine's REDIS_URL options (config checks them without loading the engine);
- `codec`: how a Message and the control markers are written to Redis;
- `lua`: the server-side scripts that change shared interest, leases and stored state.

This module imports none of them, so `fastproxy.bus.redis.options` stays light.
"""

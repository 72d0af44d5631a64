"""Cluster mode: the bus on Redis (one server or a Redis Cluster), one concern a module.

- `roles`: who serves each stream on this node (owner, follower, local), a state machine with
  no I/O: events in, actions out;
- `shell`: the engine, `RedisBus`, which performs those actions (tasks, pipelines, reconnects);
- `pubsub`: the channel subscriptions (one pub/sub connection per shard and its reader);
- `options`: the engine's REDIS_URL options (config checks them without loading the engine);
- `codec`: how a Message and the control markers are written to Redis;
- `lua`: the server-side scripts that change shared interest, leases and stored state.

This module imports none of them, so `fastproxy.bus.redis.options` stays light.
"""

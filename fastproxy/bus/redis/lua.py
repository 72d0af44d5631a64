"""The Redis bus's server-side scripts: every change to shared interest and leases is one script,
so concurrent nodes never race a read-modify-write.

Every per-stream script touches only keys of one stream, all carrying the hash tag `{stream_id}`,
so in a Redis Cluster they live on one shard and a script may use them together. Time comes
from the server (`TIME`), never from a node's clock, so nodes with skewed clocks still agree on
which interest has expired.

Keys (P is the bus prefix, S the stream id):
- `P:{S}:interest`  ZSET node id -> expiry (ms, server time); live count = members not expired.
- `P:{S}:lease`     string node id, PX lease time: the one node subscribed upstream.
- `P:{S}:last`      HASH seq -> last published seq, epoch -> its epoch, msg -> last published
                    Message (wire form), status -> the owner's last freshness marker. seq and
                    epoch outlive msg, so a later owner continues the numbering.
- `P:{S}:hist`      STREAM of the last published Messages of the current epoch, for resumes on
                    any node: entry id `0-<seq>`, fields t (publish time, ms) and m (wire
                    form); capped at HISTORY_MAX_MESSAGES, written by PUBLISH with the publish
                    itself, gone when the stream published nothing for HISTORY_MAX_AGE.
- `P:nodes`         ZSET node id -> expiry: the live nodes, for observability.
The channel `P:{S}:ch` (PUBLISH, or SPUBLISH on a cluster) carries the owner's Messages.
"""

from __future__ import annotations

import hashlib

# Redis < 5 replicates whole scripts and refuses writes after TIME without this; newer servers
# always replicate effects and keep the call as a no-op.
_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


class Script:
    """A script body and its SHA1, so callers can EVALSHA in pipelines."""

    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.name!r}, {self.sha[:8]})"


# A node whose clients hold the stream: renew its interest, renew its lease if it has it, take
# the lease if nobody has it. Returns {owner, stored seq, live interest count, stored epoch}.
# KEYS: interest, lease, last. ARGV: node, interest ttl ms, lease ms.
HOLD = Script(
    "hold",
    _NOW
    + """
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
-- the set outlives its newest member and no longer: a cluster with no live holder leaves nothing
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
local owner = redis.call('GET', KEYS[2])
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
elseif not owner then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
  owner = ARGV[1]
end
local last = redis.call('HMGET', KEYS[3], 'seq', 'epoch')
return {owner, last[1] or '0', redis.call('ZCARD', KEYS[1]), last[2] or ''}
""",
)

# A node whose clients no longer hold the stream (or that is shutting down): drop its interest.
# If it owns the lease, keep it while anyone else in the cluster is interested (renewing it),
# else give it up; with force, give it up regardless (shutdown, upstream rejection) and publish
# `marker` so the interested nodes react at once instead of at their next heartbeat.
# Returns {owner ('' when released), live interest count}.
# KEYS: interest, lease, last. ARGV: node, lease ms, force '1'/'0', publish command, channel,
# marker ('' for none).
LEAVE = Script(
    "leave",
    _NOW
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
local owner = redis.call('GET', KEYS[2])
if owner ~= ARGV[1] then return {owner or '', n} end
if n > 0 and ARGV[3] ~= '1' then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return {owner, n}
end
redis.call('DEL', KEYS[2])
-- nobody holds the stream: a later owner starts a new upstream subscription, and a joiner
-- must not be served this (by then stale) state as current; seq stays so numbering continues
if n == 0 then redis.call('HDEL', KEYS[3], 'msg') end
if ARGV[6] ~= '' then redis.call(ARGV[4], ARGV[5], ARGV[6]) end
return {'', n}
""",
)

# The owner publishes a batch of one stream's Messages, fenced by the lease: a node that lost
# its lease (a stall, an outage) cannot publish or overwrite the stored state any more.
# Triples (seq, epoch, blob): seq '' is a control marker (published only), '-' a reset marker
# (published, and the stored Message dropped: the owner's upstream state is gone), '!' a
# freshness marker (published, and stored as `status` for nodes that join later), '+N' a
# Message that is published but not stored (a book's update), '=N' the stream's state, stored
# but not published (the whole book). Returns 1, or 0 if the lease is someone else's. Each
# published Message also goes into the history stream, in the same script, so what a resume
# reads is exactly what was published.
# KEYS: lease, last, hist. ARGV: node, publish command, channel, keep ms, history length (0:
# none), history ms, now ms, then seq/epoch/blob triples.
PUBLISH = Script(
    "publish",
    """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local seq, epoch, blob = nil, nil, nil
local hist_len = tonumber(ARGV[5])
local kept_epoch = redis.call('HGET', KEYS[2], 'epoch')
local kept_seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
for i = 8, #ARGV, 3 do
  local tag = ARGV[i]
  local head = string.sub(tag, 1, 1)
  if head == '=' then
    seq = string.sub(tag, 2)
    epoch = ARGV[i + 1]
    blob = ARGV[i + 2]
  else
    redis.call(ARGV[2], ARGV[3], ARGV[i + 2])
    if tag == '-' then
      redis.call('HDEL', KEYS[2], 'msg')
      blob = nil
    elseif tag == '!' then
      redis.call('HSET', KEYS[2], 'status', ARGV[i + 2])
    elseif tag ~= '' then
      if head == '+' then
        seq = string.sub(tag, 2)
        epoch = ARGV[i + 1]
      else
        seq = tag
        epoch = ARGV[i + 1]
        blob = ARGV[i + 2]
      end
      if hist_len > 0 then
        -- history holds one epoch's consecutive seqs: a new numbering starts it again
        if epoch ~= kept_epoch then
          redis.call('DEL', KEYS[3])
          kept_epoch, kept_seq = epoch, 0
        end
        local n = tonumber(seq)
        if n > kept_seq then
          redis.call('XADD', KEYS[3], 'MAXLEN', '~', hist_len, '0-' .. seq, 't', ARGV[7], 'm',
            ARGV[i + 2])
          kept_seq = n
        end
      end
    end
  end
end
if blob then
  redis.call('HSET', KEYS[2], 'seq', seq, 'epoch', epoch, 'msg', blob)
elseif seq then
  redis.call('HSET', KEYS[2], 'seq', seq, 'epoch', epoch)
end
if seq or blob then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
if seq and hist_len > 0 then redis.call('PEXPIRE', KEYS[3], ARGV[6]) end
return 1
""",
)

# The node registry heartbeat. Returns the number of live nodes.
# KEYS: nodes. ARGV: node, ttl ms, leave '1'/'0'.
NODE = Script(
    "node",
    _NOW
    + """
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
""",
)

SCRIPTS: tuple[Script, ...] = (HOLD, LEAVE, PUBLISH, NODE)

"""The index's Lua scripts (see schema.py for the keys) and how they are called.

Every script takes the key prefix as ARGV[1] and no KEYS: key names are built inside,
from the prefix and the slot or block hashes it is given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis
import redis.asyncio


@dataclass(frozen=True)
class LuaScript:
    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        # Redis names a script by the SHA-1 of its source: EVALSHA needs no load round trip.
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


# ARGV: prefix, worker_id, ttl_ms, field, value, ...  ->  {slot, was_live, previous_instance}
HEARTBEAT = LuaScript(
    "heartbeat",
    """
local prefix = ARGV[1]
local slot = redis.call('HGET', prefix .. 'slots', ARGV[2])
if not slot then
  slot = tostring(redis.call('INCR', prefix .. 'slot_seq'))
  redis.call('HSET', prefix .. 'slots', ARGV[2], slot)
end
local live = prefix .. 'live:' .. slot
local previous = redis.call('HGET', live, 'instance') or ''
local was_live = redis.call('EXISTS', live)
redis.call('HSET', live, unpack(ARGV, 4))
redis.call('PEXPIRE', live, ARGV[3])
redis.call('SADD', prefix .. 'workers', slot)
return {tonumber(slot), was_live, previous}
""",
)

# ARGV: prefix, slot, hash, ...  ->  number of hashes
STORE = LuaScript(
    "store",
    """
local prefix, slot = ARGV[1], ARGV[2]
local held = prefix .. 'held:' .. slot
for i = 3, #ARGV do
  redis.call('SADD', prefix .. 'b:' .. ARGV[i], slot)
  redis.call('SADD', held, ARGV[i])
end
-- A batch that lands after this worker was reaped is found and reaped again.
redis.call('SADD', prefix .. 'workers', slot)
return #ARGV - 2
""",
)

# ARGV: prefix, slot, hash, ...  ->  number of hashes
REMOVE = LuaScript(
    "remove",
    """
local prefix, slot = ARGV[1], ARGV[2]
local held = prefix .. 'held:' .. slot
for i = 3, #ARGV do
  -- Redis deletes a set when its last member goes: no empty block keys stay behind.
  redis.call('SREM', prefix .. 'b:' .. ARGV[i], slot)
  redis.call('SREM', held, ARGV[i])
end
return #ARGV - 2
""",
)

# ARGV: prefix, slot. The new full set is staged in sync:<slot>.  ->  {added, removed}
RECONCILE = LuaScript(
    "reconcile",
    """
local prefix, slot = ARGV[1], ARGV[2]
local held, staged = prefix .. 'held:' .. slot, prefix .. 'sync:' .. slot
local added = redis.call('SDIFF', staged, held)
for _, h in ipairs(added) do redis.call('SADD', prefix .. 'b:' .. h, slot) end
local removed = redis.call('SDIFF', held, staged)
for _, h in ipairs(removed) do redis.call('SREM', prefix .. 'b:' .. h, slot) end
if redis.call('EXISTS', staged) == 1 then
  redis.call('RENAME', staged, held)
  redis.call('PERSIST', held)
else
  redis.call('DEL', held)
end
redis.call('SADD', prefix .. 'workers', slot)
return {#added, #removed}
""",
)

# ARGV: prefix, budget  ->  {entries removed, 1 if more remain}
# Removes the entries of workers whose liveness key expired, at most `budget` per call so
# that Redis is never blocked for long.
REAP = LuaScript(
    "reap",
    """
local prefix, budget = ARGV[1], tonumber(ARGV[2])
local reaped = 0
for _, slot in ipairs(redis.call('SMEMBERS', prefix .. 'workers')) do
  if redis.call('EXISTS', prefix .. 'live:' .. slot) == 0 then
    local held = prefix .. 'held:' .. slot
    local hashes = redis.call('SPOP', held, budget - reaped)
    for _, h in ipairs(hashes) do redis.call('SREM', prefix .. 'b:' .. h, slot) end
    reaped = reaped + #hashes
    if redis.call('EXISTS', held) == 0 then
      redis.call('SREM', prefix .. 'workers', slot)
      redis.call('DEL', prefix .. 'sync:' .. slot)
    end
    if reaped >= budget then return {reaped, 1} end
  end
end
return {reaped, 0}
""",
)

# ARGV: prefix, with_status ("1"/"0"), the prompt's block hashes concatenated (16 bytes each)
#   ->  JSON [[depth, worker_id(, address, queued_tokens, updated_at)], ...], one entry per
#       live worker. One argument and one string back: the client neither packs hundreds of
#       arguments nor parses hundreds of reply elements.
LOOKUP = LuaScript(
    "lookup",
    """
local prefix, with_status, blob = ARGV[1], ARGV[2] == '1', ARGV[3]
local size = 16
local live = {}
local matching = {}
local remaining = 0
for _, slot in ipairs(redis.call('SMEMBERS', prefix .. 'workers')) do
  if redis.call('EXISTS', prefix .. 'live:' .. slot) == 1 then
    live[#live + 1] = slot
    matching[slot] = true
    remaining = remaining + 1
  end
end
local blocks = math.floor(#blob / size)
local depth = {}
for i = 0, blocks - 1 do
  if remaining == 0 then break end
  local still = {}
  local before = remaining
  remaining = 0
  local key = prefix .. 'b:' .. string.sub(blob, i * size + 1, (i + 1) * size)
  for _, slot in ipairs(redis.call('SMEMBERS', key)) do
    if matching[slot] then
      still[slot] = true
      remaining = remaining + 1
    end
  end
  if remaining < before then
    for slot in pairs(matching) do
      if not still[slot] then depth[slot] = i end
    end
  end
  matching = still
end
for slot in pairs(matching) do depth[slot] = blocks end
if #live == 0 then return '[]' end
local out = {}
for _, slot in ipairs(live) do
  local key = prefix .. 'live:' .. slot
  if with_status then
    local s = redis.call('HMGET', key, 'worker_id', 'address', 'queued_tokens', 'updated_at')
    out[#out + 1] = {depth[slot], s[1], s[2], tonumber(s[3]) or 0, tonumber(s[4]) or 0}
  else
    out[#out + 1] = {depth[slot], redis.call('HGET', key, 'worker_id')}
  end
end
return cjson.encode(out)
""",
)

# ARGV: prefix  ->  {status, status, ...} of the live workers (flat HGETALL lists)
LIVE_WORKERS = LuaScript(
    "live_workers",
    """
local prefix = ARGV[1]
local out = {}
for _, slot in ipairs(redis.call('SMEMBERS', prefix .. 'workers')) do
  local status = redis.call('HGETALL', prefix .. 'live:' .. slot)
  if #status > 0 then out[#out + 1] = status end
end
return out
""",
)

ALL_SCRIPTS = (HEARTBEAT, STORE, REMOVE, RECONCILE, REAP, LOOKUP, LIVE_WORKERS)

Arg = str | bytes | int | float


def load_all(client: redis.Redis) -> None:
    for script in ALL_SCRIPTS:
        client.script_load(script.source)


async def load_all_async(client: redis.asyncio.Redis) -> None:
    for script in ALL_SCRIPTS:
        await client.script_load(script.source)


def evalsha_args(script: LuaScript, args: Sequence[Arg]) -> tuple[str, int, list[Arg]]:
    """(sha, numkeys, argv) for EVALSHA: the scripts take no KEYS."""
    return script.sha, 0, list(args)

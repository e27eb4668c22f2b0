"""The Lua scripts of :mod:`core.memory.redis`; each call of the store is one of them.

Every script is atomic and checks key types before it writes where a half-done write
could otherwise be left behind. Times come from the Redis server (``TIME``), so front
ends with skewed clocks agree on expiries and leases.

A message id's dedupe state, in the ``replies`` hash: ``p:{token}`` while the holder of
``token`` answers it (its expiry in ``seen`` is a lease away), ``d:{reply}`` once the
reply is stored (kept for the redelivery window). ``seen`` scores every id by its expiry,
so expired ids go first and the count cap drops the oldest.

What a script costs Redis is mostly not its commands but what surrounds each: every
``redis.call`` converts its arguments and parses its reply into Lua values, a Lua number
passed as an argument is printed with ``%.17g`` and a string made a number is parsed
with ``strtod`` (thousands of instructions each), and every table in a script's reply is
probed for a handful of special fields. So the per-message scripts (``begin``,
``finish``) have the store's settings written into their source (:func:`sources`: no
arguments for them, and numbers parsed once, when the script is compiled), pass numbers
to Redis as strings (``string.format('%d')``, or an argument as it came), read with one
call what one call can read (``MGET``; the reads that check key types also give what the
script needs), write only what changed, and answer in one flat table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Settings:
    """The store's settings the scripts are written with (milliseconds, counts, seconds)."""

    lease_ms: int
    stale_ms: int  # a waiter silent this long has left the queue
    window: int
    ttl: int  # seconds
    slack_ms: int  # a conversation's TTL is set again once this much has run down
    dedupe_ms: int
    dedupe_max: int


def sources(settings: Settings) -> dict[str, str]:
    """Every script of the store by name, written for ``settings``."""
    values = {
        "LEASE_MS": settings.lease_ms,
        "STALE_MS": settings.stale_ms,
        "WINDOW": settings.window,
        "TTL": settings.ttl,
        "TTL_MS": settings.ttl * 1000,
        "SLACK_MS": settings.slack_ms,
        "DEDUPE_MS": settings.dedupe_ms,
        "DEDUPE_MAX": settings.dedupe_max,
        "QUEUE_MS": settings.lease_ms + settings.stale_ms,
    }
    scripts = {"load": LOAD, "append": APPEND, "reset": RESET, "begin": BEGIN,
               "finish": FINISH, "abort": ABORT, "renew": RENEW, "forget_user": FORGET_USER}

    def value(match: re.Match[str]) -> str:
        # As a number ($KEY) or as the string Redis is given ('@KEY').
        number = str(int(values[match[2]]))
        return number if match[1] == "$" else f"'{number}'"

    return {name: re.sub(r"([$@])([A-Z_]+)\b", value, source)
            for name, source in scripts.items()}


# `now` in ms (the arithmetic makes TIME's strings numbers).
_NOW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
"""

# The window's version, for the front ends' caches of it: '{epoch}:{n}', n counting the
# turns pushed since the epoch began (a fresh epoch, named by the writer's token, when a
# write finds no valid version); '' for an empty window; '?' for turns written by
# something that kept no version (never equal to what a cache holds). The `ver` key
# keeps '{epoch}:{n}:{newest turn}': a writer that pushed without updating it (an older
# front end) left another turn last, and the version is then '?'. `v` is the ver key's
# value, `last` the window's newest turn (false: the window is empty).
_VERSION_FN = """
local function version(v, last)
  if not last then return nil, 0 end
  if v then
    local epoch, n, had = string.match(v, '^([^:]*):(%d+):(.*)$')
    if epoch and had == last then return epoch, n end  -- (n: digits, a string)
  end
  return nil, -1
end
local function version_text(epoch, n)
  if epoch then return epoch .. ':' .. n end
  return n == 0 and '' or '?'
end
"""

# Loads the window for a caller that has version `have` of it cached (`v`: the ver
# key's value) into `out` (a flat reply): the current version, the window's length, 1
# and the turns pushed since when those are enough, else 0 and the whole window; then
# the user's facts, name and value each. Refreshes the conversation's TTL once it has
# run down by the slack (members, indexes and version with it), so most loads cost one
# PTTL instead of an EXPIRE per key.
_LOAD_FN = _VERSION_FN + """
local function load(out, conv, members, ver, facts, v, have)
  local epoch, n = version(v, redis.call('LINDEX', conv, -1))
  local current = version_text(epoch, n)
  local turns, tail, llen = nil, 1, 0  -- the caller has it all (and needs no length)
  if have ~= current or current == '?' then
    llen = redis.call('LLEN', conv)
    tail = 0
    if epoch and have ~= '' then
      local had_epoch, had = string.match(have, '^([^:]*):(%d+)$')
      had, n = tonumber(had), tonumber(n)
      if had_epoch == epoch and had < n and n - had <= math.min($WINDOW, llen) then
        turns, tail = redis.call('LRANGE', conv, string.format('%d', had - n), '-1'), 1
      end
    end
    if not turns then turns = redis.call('LRANGE', conv, '-$WINDOW', '-1') end
  end
  if redis.call('PTTL', conv) < $TTL_MS - $SLACK_MS
      and redis.call('EXPIRE', conv, @TTL) == 1 then
    redis.call('EXPIRE', ver, @TTL)
    redis.call('EXPIRE', members, @TTL)
    for _, idx in ipairs(redis.call('HVALS', members)) do redis.call('EXPIRE', idx, @TTL) end
  end
  local k = #out
  out[k + 1], out[k + 2], out[k + 3] = current, llen, tail
  k = k + 4
  if turns then
    out[k] = #turns
    for i = 1, #turns do out[k + i] = turns[i] end
    k = k + #turns
  else
    out[k] = 0
  end
  for _, field in ipairs(redis.call('HGETALL', facts)) do
    k = k + 1
    out[k] = field
  end
  return out
end
"""

# KEYS: conv, members, ver, facts. The reply as _LOAD_FN's.
LOAD = _LOAD_FN + """
return load({}, KEYS[1], KEYS[2], KEYS[3], KEYS[4], redis.call('GET', KEYS[3]), '?')"""

# The per-message scripts name their keys themselves, from '{p}:{bot}:' and the ref
# (fewer arguments to encode on every call; standalone Redis allows it).
_KEYS_FN = """
local base, ref = ARGV[1], ARGV[2]
local function key(kind) return base .. kind .. ':' .. ref end
"""

# ARGV: '{p}:{bot}:', ref, facts key, message id, token, the version of the window the
# caller has cached ('?': none).
# {1, then as load}: claimed; {2, reply}: answered before; {0}: wait (queued).
# On the common path (a new id, the lease free, no queue) it expires old ids, reads the
# id's state, the lease and version (one MGET) and whether there is a queue, takes the
# lease, marks the id pending and loads.
BEGIN = _NOW + _KEYS_FN + _LOAD_FN + """
local seen, replies, lease, ver = key('seen'), key('replies'), key('lease'), key('ver')
local id, token, now_s = ARGV[4], ARGV[5], string.format('%d', now)
local old = redis.call('ZRANGEBYSCORE', seen, '-inf', now_s)  -- ids whose window ended
if #old > 0 then
  redis.call('HDEL', replies, unpack(old))
  redis.call('ZREMRANGEBYSCORE', seen, '-inf', now_s)
end
local state = redis.call('HGET', replies, id)
local got = redis.call('MGET', lease, ver)  -- (not a string: read as none, then replaced)
local holder, head, queue, beats = got[1], nil, nil, nil
if redis.call('EXISTS', key('queue')) == 1 then
  queue, beats = key('queue'), key('beats')
  head = redis.call('ZRANGE', queue, '0', '0')[1]
  -- Waiters that stopped asking (their front end died) leave the queue.
  local stale = redis.call('ZRANGEBYSCORE', beats, '-inf', string.format('%d', now - $STALE_MS))
  if #stale > 0 then
    redis.call('ZREM', queue, unpack(stale))
    redis.call('ZREM', beats, unpack(stale))
    head = redis.call('ZRANGE', queue, '0', '0')[1]
  end
end
if state and string.sub(state, 1, 2) == 'd:' then
  if head then redis.call('ZREM', queue, token) redis.call('ZREM', beats, token) end
  return {2, string.sub(state, 3)}
end
if (holder and holder ~= token) or (head and head ~= token)
    or (state and state ~= 'p:' .. token) then
  queue, beats = key('queue'), key('beats')
  redis.call('ZADD', queue, 'NX', now_s, token)
  redis.call('ZADD', beats, now_s, token)
  redis.call('PEXPIRE', queue, @QUEUE_MS)
  redis.call('PEXPIRE', beats, @QUEUE_MS)
  return {0}
end
if head then redis.call('ZREM', queue, token) redis.call('ZREM', beats, token) end
redis.call('SET', lease, token, 'PX', @LEASE_MS)
redis.call('HSET', replies, id, 'p:' .. token)
redis.call('ZADD', seen, string.format('%d', now + $LEASE_MS), id)
if redis.call('PTTL', seen) < $LEASE_MS then
  redis.call('PEXPIRE', seen, @LEASE_MS)
  redis.call('PEXPIRE', replies, @LEASE_MS)
end
return load({1}, key('conv'), key('members'), ver, ARGV[3], got[2], ARGV[6])
"""

_WRONG_FN = """
local function wrong(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= kind then return 'WRONGTYPE ' .. key .. ' is a ' .. t end
end
"""

# Appends turns (ARGV from `first`: n, n x (user id, index key, '1' if one of the user's
# turns is among the pushed ones that stay in the window), turns as JSON) to conv, trims
# to the window and keeps members and user indexes in step: a user stays a member while
# their turns are in the window or their replies in the dedupe record (seenby; `keeper`,
# whose reply the caller is storing, stays). The window is decoded only to look for a
# member that is neither (in a one-user conversation, never).
#
# Nothing is written until every key it writes is known to be of its type: the reads
# come first and each fails on a wrong type (LINDEX conv, HGETALL members, and the
# caller's read of ver, `v`: a GET, or an MGET that reads another type as none before a
# SET replaces it), then a TYPE of each index key about to be written (on the common
# path none: they are written when the TTLs are refreshed or a member joins); then
# `prelude` (the caller's first write, itself failing on its key's type), then the
# writes. Returns an error text, or nil, the version before and after (see _VERSION_FN;
# `epoch` names a fresh one) and the window's length (0 when nothing was pushed).
_APPEND_FN = _WRONG_FN + _VERSION_FN + """
local function append(conv, members, seenby, ver, v, ref, first, now, epoch, keeper, prelude)
  local n = tonumber(ARGV[first])
  local pushed = #ARGV - (first + 3 * n)
  local last = redis.call('LINDEX', conv, '-1')
  local pairs_ = redis.call('HGETALL', members)
  local known, fresh, added = {}, {}, {}
  for i = 1, #pairs_, 2 do known[pairs_[i]] = pairs_[i + 1] end
  for i = 0, n - 1 do
    local user, idx = ARGV[first + 1 + 3 * i], ARGV[first + 2 + 3 * i]
    if known[user] ~= idx then added[user] = true end
    known[user] = idx
    fresh[user] = ARGV[first + 3 + 3 * i] == '1'
  end
  -- The TTLs of the window, its members and their indexes are set again once a tenth of
  -- the TTL (at most a minute) has run down, as a load does, and at once for what is new
  -- (a member's index key is then just made or joined): every member's index holds the
  -- conversation and lives at least as long as it.
  local refresh = pushed == 0 or redis.call('PTTL', conv) < $TTL_MS - $SLACK_MS
  local join, leave, present = {}, {}, nil
  for user, idx in pairs(known) do
    local kept = pushed == 0 or fresh[user] or user == keeper  -- without a push nothing left
    if not kept then
      kept = (tonumber(redis.call('ZSCORE', seenby, user)) or 0) > now
    end
    if not kept then
      if not present then
        -- Who has a turn among the older ones that stay (the pushed ones are `fresh`).
        present = {}
        if $WINDOW > pushed then
          local older = redis.call('LRANGE', conv, string.format('%d', pushed - $WINDOW), '-1')
          for _, raw in ipairs(older) do
            local ok, turn = pcall(cjson.decode, raw)
            if ok and type(turn) == 'table' and type(turn.user_id) == 'string' then
              present[turn.user_id] = true
            end
          end
        end
      end
      kept = present[user]
    end
    if kept then
      if refresh or added[user] then join[#join + 1] = user end
    else
      leave[#leave + 1] = user
    end
  end
  -- The index keys about to be written, join's then leave's (i past join: leave's).
  local joining = #join
  for i = 1, joining + #leave do
    local bad = wrong(known[join[i] or leave[i - joining]], 'set')
    if bad then return bad end
  end
  if prelude then prelude() end
  -- Nothing is written above this line.
  local had, count = version(v, last)
  local before = version_text(had, count)
  if not had then count = 0 else epoch = had end
  local length = 0
  if pushed > 0 then
    -- In one RPUSH for a message's turns (its reply is the length); a long batch in
    -- pieces, as Lua unpacks a few thousand values at most.
    for i = first + 1 + 3 * n, #ARGV, 1000 do
      length = redis.call('RPUSH', conv, unpack(ARGV, i, math.min(i + 999, #ARGV)))
    end
    if length > $WINDOW then
      redis.call('LTRIM', conv, '-$WINDOW', '-1')
      length = $WINDOW
    end
    count = string.format('%d', count + pushed)
    redis.call('SET', ver, epoch .. ':' .. count .. ':' .. ARGV[#ARGV], 'EX', @TTL)
  end
  local joined = false
  for _, user in ipairs(join) do
    if added[user] then
      redis.call('HSET', members, user, known[user])
      joined = true
    end
    redis.call('SADD', known[user], ref)
    redis.call('EXPIRE', known[user], @TTL)
  end
  for _, user in ipairs(leave) do
    redis.call('SREM', known[user], ref)
    redis.call('HDEL', members, user)
  end
  if refresh then
    if pushed > 0 then redis.call('EXPIRE', conv, @TTL) end
    redis.call('EXPIRE', members, @TTL)
  elseif joined then
    redis.call('EXPIRE', members, @TTL)
  end
  local after = pushed > 0 and (epoch .. ':' .. count) or before
  return nil, before, after, length
end
"""

# KEYS: conv, members, seenby, ver.
# ARGV: ref, epoch, n, n x (user id, index key, fresh), turns (JSON).
APPEND = _NOW + _APPEND_FN + """
local bad = append(KEYS[1], KEYS[2], KEYS[3], KEYS[4], redis.call('GET', KEYS[4]), ARGV[1],
                   3, now, ARGV[2])
if bad then return redis.error_reply(bad) end
return 1
"""

# ARGV: '{p}:{bot}:', ref, message id, token, 'd:' and the reply, user id, n, n x (user
# id, index key, fresh), turns (JSON).
# {1, version before, version after, length} (see _APPEND_FN): stored; {0}: stored
# before (a repeat after success). Its reads check the types of replies (HGET) and seen
# (ZCARD), and its first write is to seenby, so a wrong type fails it before it wrote.
FINISH = _NOW + _KEYS_FN + _APPEND_FN + """
local seen, replies, lease, seenby = key('seen'), key('replies'), key('lease'), key('seenby')
local id, token = ARGV[3], ARGV[4]
local state = redis.call('HGET', replies, id)
if state and string.sub(state, 1, 2) == 'd:' then
  if redis.call('GET', lease) == token then redis.call('DEL', lease) end
  return {0}
end
local got = redis.call('MGET', key('ver'), lease)  -- (not a string: read as none, then replaced)
local count = redis.call('ZCARD', seen)
local ends = string.format('%d', now + $DEDUPE_MS)
local bad, before, after, length = append(
  key('conv'), key('members'), seenby, key('ver'), got[1], ref, 7, now, token, ARGV[6],
  function() redis.call('ZADD', seenby, ends, ARGV[6]) end)
if bad then return redis.error_reply(bad) end
redis.call('PEXPIRE', seenby, @DEDUPE_MS)
-- (Ids whose window ended went in begin; one that ended since is the oldest, and the cap
-- below drops it first.)
redis.call('HSET', replies, id, ARGV[5])
local extra = count + redis.call('ZADD', seen, ends, id) - $DEDUPE_MAX
if extra > 0 then
  local last = string.format('%d', extra - 1)
  redis.call('HDEL', replies, unpack(redis.call('ZRANGE', seen, '0', last)))
  redis.call('ZREMRANGEBYRANK', seen, '0', last)
end
redis.call('PEXPIRE', seen, @DEDUPE_MS)
redis.call('PEXPIRE', replies, @DEDUPE_MS)
if got[2] == token then redis.call('DEL', lease) end
return {1, before, after, length}
"""

# ARGV: '{p}:{bot}:', ref, message id, token.
ABORT = _KEYS_FN + """
local id, token = ARGV[3], ARGV[4]
if redis.call('HGET', key('replies'), id) == 'p:' .. token then
  redis.call('HDEL', key('replies'), id)
  redis.call('ZREM', key('seen'), id)
end
if redis.call('GET', key('lease')) == token then redis.call('DEL', key('lease')) end
redis.call('ZREM', key('queue'), token)
redis.call('ZREM', key('beats'), token)
return 1
"""

# ARGV: '{p}:{bot}:', ref, message id, token. 1 while still held.
RENEW = _NOW + _KEYS_FN + """
local id, token = ARGV[3], ARGV[4]
local seen, replies, lease = key('seen'), key('replies'), key('lease')
if redis.call('GET', lease) ~= token then return 0 end
redis.call('PEXPIRE', lease, @LEASE_MS)
if redis.call('HGET', replies, id) == 'p:' .. token then
  redis.call('ZADD', seen, 'XX', string.format('%d', now + $LEASE_MS), id)
  if redis.call('PTTL', seen) < $LEASE_MS then
    redis.call('PEXPIRE', seen, @LEASE_MS)
    redis.call('PEXPIRE', replies, @LEASE_MS)
  end
end
return 1
"""

# KEYS: conv, members, ver. ARGV: ref.
RESET = """
for _, idx in ipairs(redis.call('HVALS', KEYS[2])) do redis.call('SREM', idx, ARGV[1]) end
redis.call('DEL', KEYS[3])
return redis.call('DEL', KEYS[1], KEYS[2])
"""

# KEYS: user index, facts. ARGV: '{p}:{bot}:'. Returns conversations + facts deleted.
FORGET_USER = """
local base, count = ARGV[1], 0
for _, ref in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local members = base .. 'members:' .. ref
  for _, idx in ipairs(redis.call('HVALS', members)) do redis.call('SREM', idx, ref) end
  count = count + redis.call('EXISTS', base .. 'conv:' .. ref)
  redis.call('DEL', base .. 'conv:' .. ref, members, base .. 'ver:' .. ref,
             base .. 'seen:' .. ref,
             base .. 'replies:' .. ref, base .. 'seenby:' .. ref)
end
count = count + redis.call('HLEN', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2])
return count
"""

"""The Lua scripts of :mod:`core.memory.redis`; each call of the store is one of them.

Every script is atomic and checks key types before it writes where a half-done write
could otherwise be left behind. Times come from the Redis server (``TIME``), so front
ends with skewed clocks agree on expiries and leases.

A message id's dedupe state, in the ``replies`` hash: ``p:{token}`` while the holder of
``token`` answers it (its expiry in ``seen`` is a lease away), ``d:{reply}`` once the
reply is stored (kept for the redelivery window). ``seen`` scores every id by its expiry,
so expired ids go first and the count cap drops the oldest.
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# The window's version, for the front ends' caches of it: '{epoch}:{n}', n counting the
# turns pushed since the epoch began (a fresh epoch, named by the writer's token, when a
# write finds no valid version); '' for an empty window; '?' for turns written by
# something that kept no version (never equal to what a cache holds). The `ver` key
# keeps '{epoch}:{n}:{newest turn}': a writer that pushed without updating it (an older
# front end) left another turn last, and the version is then '?'.
_VERSION_FN = """
local function version(conv, ver)
  local v = redis.call('GET', ver)
  if v then
    local epoch, n, last = string.match(v, '^([^:]*):(%d+):(.*)$')
    if epoch and redis.call('LINDEX', conv, -1) == last then return epoch, tonumber(n) end
  end
  if redis.call('EXISTS', conv) == 0 then return nil, 0 end
  return nil, -1
end
local function version_text(epoch, n)
  if epoch then return epoch .. ':' .. n end
  return n == 0 and '' or '?'
end
"""

# Loads the window for a caller that has version `have` of it cached: only the turns
# pushed since, when that is enough ({current version, length, 1, new turns, facts}),
# else the whole window ({current version, length, 0, turns, facts}). Refreshes the
# conversation's TTL once it has run down by `slack` ms (members, indexes and version
# with it), so most loads cost one PTTL instead of an EXPIRE per key.
_LOAD_FN = _VERSION_FN + """
local function load(conv, members, ver, facts, window, ttl, slack, have)
  window = tonumber(window)
  local epoch, n = version(conv, ver)
  local current = version_text(epoch, n)
  local turns, tail, llen = {}, 1, 0  -- the caller has it all (and needs no length)
  if have ~= current or current == '?' then
    llen = redis.call('LLEN', conv)
    turns, tail = nil, 0
    if epoch and have ~= '' then
      local had_epoch, had = string.match(have, '^([^:]*):(%d+)$')
      had = tonumber(had)
      if had_epoch == epoch and had < n and n - had <= math.min(window, llen) then
        turns, tail = redis.call('LRANGE', conv, had - n, -1), 1
      end
    end
    if not turns then turns = redis.call('LRANGE', conv, -window, -1) end
  end
  if redis.call('PTTL', conv) < tonumber(ttl) * 1000 - tonumber(slack)
      and redis.call('EXPIRE', conv, ttl) == 1 then
    redis.call('EXPIRE', ver, ttl)
    redis.call('EXPIRE', members, ttl)
    for _, idx in ipairs(redis.call('HVALS', members)) do redis.call('EXPIRE', idx, ttl) end
  end
  return {current, llen, tail, turns, redis.call('HGETALL', facts)}
end
"""

# KEYS: conv, members, ver, facts. ARGV: window, ttl, slack ms.
LOAD = _LOAD_FN + """
return load(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], '?')"""

# Drops ids whose window ended (from seen and replies).
_EXPIRE_IDS_FN = """
local function expire_ids(seen, replies, now)
  local old = redis.call('ZRANGEBYSCORE', seen, '-inf', now)
  if #old > 0 then
    redis.call('HDEL', replies, unpack(old))
    redis.call('ZREMRANGEBYSCORE', seen, '-inf', now)
  end
end
"""

# The per-message scripts name their keys themselves, from '{p}:{bot}:' and the ref
# (fewer arguments to encode on every call; standalone Redis allows it).
_KEYS_FN = """
local base, ref = ARGV[1], ARGV[2]
local function key(kind) return base .. kind .. ':' .. ref end
"""

# ARGV: '{p}:{bot}:', ref, facts key, message id, token, lease ms, stale ms, window, ttl,
#       slack ms, the version of the window the caller has cached ('?': none).
# {1, version, length, tail?, turns, facts}: claimed (see load); {2, reply}: answered
# before; {0}: wait (queued).
BEGIN = _NOW + _KEYS_FN + _EXPIRE_IDS_FN + _LOAD_FN + """
local seen, replies, lease = key('seen'), key('replies'), key('lease')
local queue, beats = key('queue'), key('beats')
local id, token, lease_ms, stale_ms = ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
expire_ids(seen, replies, now)
local state = redis.call('HGET', replies, id)
local head = redis.call('ZRANGE', queue, 0, 0)[1]
if head then
  -- Waiters that stopped asking (their front end died) leave the queue.
  local stale = redis.call('ZRANGEBYSCORE', beats, '-inf', now - stale_ms)
  if #stale > 0 then
    redis.call('ZREM', queue, unpack(stale))
    redis.call('ZREM', beats, unpack(stale))
    head = redis.call('ZRANGE', queue, 0, 0)[1]
  end
end
if state and string.sub(state, 1, 2) == 'd:' then
  if head then redis.call('ZREM', queue, token) redis.call('ZREM', beats, token) end
  return {2, string.sub(state, 3)}
end
local holder = redis.call('GET', lease)
if (holder and holder ~= token) or (head and head ~= token)
    or (state and state ~= 'p:' .. token) then
  redis.call('ZADD', queue, 'NX', now, token)
  redis.call('ZADD', beats, now, token)
  redis.call('PEXPIRE', queue, lease_ms + stale_ms)
  redis.call('PEXPIRE', beats, lease_ms + stale_ms)
  return {0}
end
if head then redis.call('ZREM', queue, token) redis.call('ZREM', beats, token) end
redis.call('SET', lease, token, 'PX', lease_ms)
redis.call('HSET', replies, id, 'p:' .. token)
redis.call('ZADD', seen, now + lease_ms, id)
if redis.call('PTTL', seen) < lease_ms then
  redis.call('PEXPIRE', seen, lease_ms)
  redis.call('PEXPIRE', replies, lease_ms)
end
local loaded = load(key('conv'), key('members'), key('ver'), ARGV[3], ARGV[8], ARGV[9],
                    ARGV[10], ARGV[11])
return {1, loaded[1], loaded[2], loaded[3], loaded[4], loaded[5]}
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
# their turns are in the window or their replies in the dedupe record (seenby). The
# window is decoded only to look for a member that is neither (in a one-user
# conversation, never). Returns an error text, or nil, the version before and after
# (see _VERSION_FN; `epoch` names a fresh one) and the window's length.
_APPEND_FN = _WRONG_FN + _VERSION_FN + """
local function append(conv, members, seenby, ver, window, ttl, slack, ref, first, now, epoch)
  local n = tonumber(ARGV[first])
  local bad = wrong(conv, 'list') or wrong(members, 'hash') or wrong(ver, 'string')
  local checked = {}
  for i = 0, n - 1 do
    local idx = ARGV[first + 2 + 3 * i]
    bad = bad or wrong(idx, 'set')
    checked[idx] = true
  end
  local known = {}
  local pairs_ = bad and {} or redis.call('HGETALL', members)
  for i = 1, #pairs_, 2 do
    known[pairs_[i]] = pairs_[i + 1]
    if not checked[pairs_[i + 1]] then bad = bad or wrong(pairs_[i + 1], 'set') end
  end
  if bad then return bad end
  -- Nothing is written above this line.
  local fresh, added = {}, {}
  for i = 0, n - 1 do
    local user, idx = ARGV[first + 1 + 3 * i], ARGV[first + 2 + 3 * i]
    if known[user] ~= idx then
      redis.call('HSET', members, user, idx)
      added[user] = true
    end
    known[user] = idx
    fresh[user] = ARGV[first + 3 + 3 * i] == '1'
  end
  local had, count = version(conv, ver)
  local before = version_text(had, count)
  if not had then count = 0 else epoch = had end
  local pushed = #ARGV - (first + 3 * n)
  local length = nil
  if pushed > 0 then
    -- In one RPUSH for a message's turns (its reply is the length); a long batch in
    -- pieces, as Lua unpacks a few thousand values at most.
    for i = first + 1 + 3 * n, #ARGV, 1000 do
      length = redis.call('RPUSH', conv, unpack(ARGV, i, math.min(i + 999, #ARGV)))
    end
    length = math.min(window, length)
    redis.call('LTRIM', conv, -window, -1)
    count = count + pushed
    redis.call('SET', ver, epoch .. ':' .. count .. ':' .. ARGV[#ARGV], 'EX', ttl)
  end
  -- The TTLs of the window, its members and their indexes are set again once a tenth of
  -- the TTL (at most a minute) has run down, as a load does, and at once for what is new
  -- (a member's index key is then just made or joined): every member's index holds the
  -- conversation and lives at least as long as it.
  local refresh = pushed == 0 or redis.call('PTTL', conv) < tonumber(ttl) * 1000 - slack
  local present = nil
  for user, idx in pairs(known) do
    local kept = pushed == 0 or fresh[user]  -- without a push nothing left the window
    if not kept then
      kept = (tonumber(redis.call('ZSCORE', seenby, user)) or 0) > now
    end
    if not kept then
      if not present then
        present = {}
        for _, raw in ipairs(redis.call('LRANGE', conv, 0, -1)) do
          local ok, turn = pcall(cjson.decode, raw)
          if ok and type(turn) == 'table' and type(turn.user_id) == 'string' then
            present[turn.user_id] = true
          end
        end
      end
      kept = present[user]
    end
    if kept then
      if refresh or added[user] then
        redis.call('SADD', idx, ref)
        redis.call('EXPIRE', idx, ttl)
      end
    else
      redis.call('SREM', idx, ref)
      redis.call('HDEL', members, user)
    end
  end
  if refresh then
    if pushed > 0 then redis.call('EXPIRE', conv, ttl) end
    redis.call('EXPIRE', members, ttl)
  elseif next(added) then
    redis.call('EXPIRE', members, ttl)
  end
  local after = pushed > 0 and (epoch .. ':' .. count) or before
  return nil, before, after, length or redis.call('LLEN', conv)
end
"""

# KEYS: conv, members, seenby, ver.
# ARGV: window, ttl, slack ms, ref, epoch, n, n x (user id, index key, fresh), turns (JSON).
APPEND = _NOW + _APPEND_FN + """
local bad = append(KEYS[1], KEYS[2], KEYS[3], KEYS[4], tonumber(ARGV[1]), ARGV[2],
                   tonumber(ARGV[3]), ARGV[4], 6, now, ARGV[5])
if bad then return redis.error_reply(bad) end
return 1
"""

# ARGV: '{p}:{bot}:', ref, message id, token, reply, user id, dedupe ms, max ids, window,
#       ttl, slack ms, n, n x (user id, index key, fresh), turns (JSON).
# {1, version before, version after, length} (see _APPEND_FN): stored; {0}: stored
# before (a repeat after success).
FINISH = _NOW + _KEYS_FN + _APPEND_FN + """
local seen, replies, lease, seenby = key('seen'), key('replies'), key('lease'), key('seenby')
local id, token, dedupe_ms, cap = ARGV[3], ARGV[4], tonumber(ARGV[7]), tonumber(ARGV[8])
local function release()
  if redis.call('GET', lease) == token then redis.call('DEL', lease) end
end
local state = redis.call('HGET', replies, id)
if state and string.sub(state, 1, 2) == 'd:' then release() return {0} end
local bad = wrong(seen, 'zset') or wrong(replies, 'hash') or wrong(seenby, 'zset')
if bad then return redis.error_reply(bad) end
redis.call('ZADD', seenby, now + dedupe_ms, ARGV[6])
redis.call('PEXPIRE', seenby, dedupe_ms)
local before, after, length
bad, before, after, length = append(key('conv'), key('members'), seenby, key('ver'),
                                    tonumber(ARGV[9]), ARGV[10], tonumber(ARGV[11]), ref,
                                    12, now, token)
if bad then return redis.error_reply(bad) end
-- (Ids whose window ended went in begin; one that ended since is the oldest, and the cap
-- below drops it first.)
redis.call('HSET', replies, id, 'd:' .. ARGV[5])
redis.call('ZADD', seen, now + dedupe_ms, id)
local extra = redis.call('ZCARD', seen) - cap
if extra > 0 then
  redis.call('HDEL', replies, unpack(redis.call('ZRANGE', seen, 0, extra - 1)))
  redis.call('ZREMRANGEBYRANK', seen, 0, extra - 1)
end
redis.call('PEXPIRE', seen, dedupe_ms)
redis.call('PEXPIRE', replies, dedupe_ms)
release()
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

# ARGV: '{p}:{bot}:', ref, message id, token, lease ms. 1 while still held.
RENEW = _NOW + _KEYS_FN + """
local id, token, lease_ms = ARGV[3], ARGV[4], tonumber(ARGV[5])
local seen, replies, lease = key('seen'), key('replies'), key('lease')
if redis.call('GET', lease) ~= token then return 0 end
redis.call('PEXPIRE', lease, lease_ms)
if redis.call('HGET', replies, id) == 'p:' .. token then
  redis.call('ZADD', seen, 'XX', now + lease_ms, id)
  if redis.call('PTTL', seen) < lease_ms then
    redis.call('PEXPIRE', seen, lease_ms)
    redis.call('PEXPIRE', replies, lease_ms)
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

"""The Lua scripts a ``parley worker`` runs on Redis: each one round trip, all-or-nothing.

Ownership is checked inside the scripts (the consumer that holds the job at this attempt),
so a worker that stalled and lost its job can never write into the reply of the attempt
that took over.
"""

# KEYS: jobs. ARGV: group, consumer, min idle (ms), cursor, count.
# -> {next cursor, {{id, {field, value, ...}, delivery count}, ...}}
RECLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                     'COUNT', ARGV[5])
local out = {}
for _, e in ipairs(r[2]) do
  if type(e) == 'table' then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)[1]
    out[#out + 1] = {e[1], e[2], p and p[4] or 0}
  end
end
return {r[1], out}
"""

# KEYS: jobs, cancel mark of each job. ARGV: group, consumer, idle (ms), then for each
# job: id, attempt. Sets the idle time of each job this consumer still owns at that
# attempt. -> per job: 0 ok, 1 lost (another worker has it), 2 cancelled.
TOUCH = """
local out = {}
for i = 4, #ARGV, 2 do
  local id, n = ARGV[i], (i - 2) / 2
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1]
  if not p or p[2] ~= ARGV[2] or p[4] ~= tonumber(ARGV[i + 1]) then
    out[#out + 1] = 1
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'JUSTID')
    out[#out + 1] = redis.call('EXISTS', KEYS[1 + n]) == 1 and 2 or 0
  end
end
return out
"""

# KEYS: jobs, reply, cancel. ARGV: group, consumer, id, attempt, final (0/1), reply TTL,
# field, value, ... Appends to the reply if this consumer still owns the job at this
# attempt; a final entry acks and deletes the job. -> 0 ok, 1 lost, 2 cancelled.
WRITE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)[1]
if not p or p[2] ~= ARGV[2] or p[4] ~= tonumber(ARGV[4]) then return 1 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[2], ARGV[6])
if ARGV[5] == '1' then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  redis.call('XDEL', KEYS[1], ARGV[3])
  return 0
end
return redis.call('EXISTS', KEYS[3]) == 1 and 2 or 0
"""

"""The Lua scripts of the job queue (``fhir_bridge.adapters.queue``), one per atomic move of a job.

Each runs whole or not at all in Redis, over keys that share the queue's hash tag (the key layout is in the
queue's module docstring), which is what the queue's guarantees rest on: a job given an id is enqueued once, a
due retry goes back to the stream exactly once however many workers see it due, and a delivery is settled (or
its claim refreshed) only by the worker that still owns it. Times are the Redis server's clock (``NOW_MS``),
the same for every worker.
"""

NOW_MS = "local t = redis.call('TIME')\nlocal now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# KEYS: state, stream, dead. ARGV: ttl, id, kind, payload.
ENQUEUE = f"""
local state = redis.call('GET', KEYS[1])
if state and string.sub(state, 1, 5) ~= 'dead:' then return 0 end
if state then redis.call('XDEL', KEYS[3], string.sub(state, 6)) end
{NOW_MS}
redis.call('XADD', KEYS[2], '*', 'id', ARGV[2], 'kind', ARGV[3], 'payload', ARGV[4], 'attempt', '1',
  'enqueued', string.format('%d', now))
redis.call('SET', KEYS[1], 'pending', 'EX', ARGV[1])
return 1
"""

# KEYS: delayed, stream. ARGV: most jobs to move. Returns ms until the next is due, or -1.
PROMOTE = f"""
{NOW_MS}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])) do
  local job = cjson.decode(member)
  redis.call('XADD', KEYS[2], '*', 'id', job.id, 'kind', job.kind, 'payload', job.payload,
    'attempt', job.attempt, 'enqueued', job.enqueued)
  redis.call('ZREM', KEYS[1], member)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
return nxt and math.max(0, tonumber(nxt) - now) or -1
"""

# Settle a delivery (done, retry, dead) or refresh its idle time (beat: XCLAIM JUSTID counts no delivery), only
# while this consumer still owns it: else another worker took it over and it is theirs. KEYS: stream, delayed,
# dead, state, stats. ARGV: group, consumer, entry id, outcome, ttl, kind, then delay ms and job JSON, or
# dead-letter fields.
SETTLE = f"""
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2]) == 0 then return 0 end
if ARGV[4] == 'beat' then return #redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID') end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
redis.call('HINCRBY', KEYS[5], ARGV[4] .. ':' .. ARGV[6], 1)
if ARGV[4] == 'done' then
  redis.call('SET', KEYS[4], 'done', 'EX', ARGV[5])
elseif ARGV[4] == 'retry' then
  {NOW_MS}
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), ARGV[8])
  redis.call('SET', KEYS[4], 'pending', 'EX', ARGV[5])
else
  local dead_id = redis.call('XADD', KEYS[3], '*', unpack(ARGV, 7))
  redis.call('SET', KEYS[4], 'dead:' .. dead_id, 'EX', ARGV[5])
end
return 1
"""

"""The Lua scripts of the audit log (``fhir_bridge.adapters.audit_log``), one per atomic step.

Each runs whole or not at all in Redis, over keys that share the ``{audit}`` hash tag: a reader never sees an
event without its indexes, or a chain end that points past the last stored event. Members are seqs written on
15 digits, so their lexical order is their numeric order.
"""

from fhir_bridge.adapters.lua_search import SELECT_PAGE

# KEYS: head, events, time, checkpoints, index sets. ARGV: expected seq, expected hash ('' for none), member,
# body, score (ms), new hash, checkpoint JSON or '', new seq.
APPEND = """
if (redis.call('HGET', KEYS[1], 'seq') or '0') ~= ARGV[1] or (redis.call('HGET', KEYS[1], 'hash') or '') ~= ARGV[2]
then return 'stale' end
if redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[4]) == 0 then return 'exists' end
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3])
for i = 5, #KEYS do redis.call('SADD', KEYS[i], ARGV[3]) end
redis.call('HSET', KEYS[1], 'seq', ARGV[8], 'hash', ARGV[6])
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[3], ARGV[7])
  redis.call('HSET', KEYS[1], 'cps', ARGV[8], 'cpt', ARGV[5])
end
return 'ok'
"""

# KEYS: head, checkpoints. ARGV: member, checkpoint JSON, seq, time (ms).
CHECKPOINT = """
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if tonumber(redis.call('HGET', KEYS[1], 'cps') or '0') < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'cps', ARGV[3], 'cpt', ARGV[4])
end
return 'ok'
"""

# KEYS: head, events, time, checkpoints, index sets. ARGV: expected floor, new floor seq, its hash, its signed
# checkpoint, JSON list (one entry per index set) of the members leaving that set, then the purged members.
PURGE = """
if (redis.call('HGET', KEYS[1], 'fseq') or '0') ~= ARGV[1] then return 'stale' end
local members = {}
for i = 6, #ARGV do members[#members + 1] = ARGV[i] end
redis.call('HDEL', KEYS[2], unpack(members))
redis.call('ZREM', KEYS[3], unpack(members))
redis.call('HDEL', KEYS[4], unpack(members))
local leaves = cjson.decode(ARGV[5])
for i = 5, #KEYS do redis.call('SREM', KEYS[i], unpack(leaves[i - 4])) end
redis.call('HSET', KEYS[1], 'fseq', ARGV[2], 'fhash', ARGV[3], 'fcp', ARGV[4])
return 'ok'
"""

# KEYS: time, events, then each parameter's index sets. ARGV: lowest and highest score, offset, count, number of
# parameters, then each one's number of sets. Candidates come from the smallest of the parameters' sets and the
# date window, the rest is checked member by member. Newest first (score, then seq). Returns total, then bodies.
SEARCH = SELECT_PAGE + """
local sizes = {}
for p = 1, tonumber(ARGV[5]) do sizes[p] = tonumber(ARGV[5 + p]) end
local total, ids = select_page(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
                               tonumber(ARGV[4]), 3, sizes)
local out = {total}
if #ids > 0 then
  for _, body in ipairs(redis.call('HMGET', KEYS[2], unpack(ids))) do out[#out + 1] = body or '' end
end
return out
"""

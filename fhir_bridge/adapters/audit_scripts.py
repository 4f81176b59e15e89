"""The Lua scripts of the audit log (``fhir_bridge.adapters.audit_log``), one per atomic step.

Each runs whole or not at all in Redis, over keys that share the ``{audit}`` hash tag: a reader never sees an
event without its indexes, or a chain end that points past the last stored event. Members are seqs written on
15 digits, so their lexical order is their numeric order.
"""

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
SEARCH = """
local zkey, lo, hi = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local offset, count, nparams = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local total, ids = 0, {}
if nparams == 0 then
  total = redis.call('ZCOUNT', zkey, lo, hi)
  if count > 0 then ids = redis.call('ZREVRANGEBYSCORE', zkey, hi, lo, 'LIMIT', offset, count) end
else
  local params, k, scored = {}, 3, {}
  for p = 1, nparams do
    local last, size = k + tonumber(ARGV[5 + p]) - 1, 0
    for i = k, last do size = size + redis.call('SCARD', KEYS[i]) end
    params[p], k = {k, last, size}, last + 1
  end
  table.sort(params, function(a, b) return a[3] < b[3] end)
  local candidates, from = nil, 2
  if redis.call('ZCOUNT', zkey, lo, hi) < params[1][3] then
    candidates, from = redis.call('ZRANGEBYSCORE', zkey, lo, hi), 1
  else
    candidates = redis.call('SUNION', unpack(KEYS, params[1][1], params[1][2]))
  end
  for _, id in ipairs(candidates) do
    local score = tonumber(redis.call('ZSCORE', zkey, id))
    local keep = score ~= nil and score >= lo and score <= hi
    for p = from, #params do
      local any = false
      for i = params[p][1], params[p][2] do any = any or (keep and redis.call('SISMEMBER', KEYS[i], id) == 1) end
      keep = any
    end
    if keep then scored[#scored + 1] = {score, id} end
  end
  table.sort(scored, function(a, b) if a[1] ~= b[1] then return a[1] > b[1] end return a[2] > b[2] end)
  total = #scored
  for i = offset + 1, math.min(offset + count, total) do ids[#ids + 1] = scored[i][2] end
end
local out = {total}
if #ids > 0 then
  for _, body in ipairs(redis.call('HMGET', KEYS[2], unpack(ids))) do out[#out + 1] = body or '' end
end
return out
"""

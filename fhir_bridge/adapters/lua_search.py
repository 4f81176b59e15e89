"""The page selection both Redis searches share (resource store and audit log), as one Lua function.

Items live in a sorted set scored by time and in index sets ``<param>=<value>``. A search ANDs parameters and
ORs the sets of one parameter. Candidates come from whichever is smaller: the time window, or the union of the
parameter with the fewest members; every other parameter is then checked member by member. Newest first
(score, then member). Each script prepends this to its own body and fetches the bodies its own way.
"""

# select_page(zkey, lo, hi, offset, count, first_key, sizes) -> total, ids
#   zkey: the time sorted set; lo/hi: score window; first_key: index in KEYS of the first parameter's first set;
#   sizes: for each parameter, how many of the following KEYS are its sets.
SELECT_PAGE = """
local function select_page(zkey, lo, hi, offset, count, first_key, sizes)
  local ids = {}
  if #sizes == 0 then
    if count > 0 then ids = redis.call('ZREVRANGEBYSCORE', zkey, hi, lo, 'LIMIT', offset, count) end
    return redis.call('ZCOUNT', zkey, lo, hi), ids
  end
  local params, k, scored = {}, first_key, {}
  for p = 1, #sizes do
    local last, size = k + sizes[p] - 1, 0
    for i = k, last do size = size + redis.call('SCARD', KEYS[i]) end
    params[p], k = {k, last, size}, last + 1
  end
  table.sort(params, function(a, b) return a[3] < b[3] end)
  local candidates, from
  if redis.call('ZCOUNT', zkey, lo, hi) < params[1][3] then
    candidates, from = redis.call('ZRANGEBYSCORE', zkey, lo, hi), 1
  else
    candidates, from = redis.call('SUNION', unpack(KEYS, params[1][1], params[1][2])), 2
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
  for i = offset + 1, math.min(offset + count, #scored) do ids[#ids + 1] = scored[i][2] end
  return #scored, ids
end
"""

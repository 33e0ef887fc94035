-- Apply one normalised Segment event to a space's profile state, atomically.
--
-- dedupe by messageId -> suppression -> identity resolution (match / create / merge under limits) ->
-- effects (traits, audiences, orders, channel activity, groups, metadata) -> event log -> dirty mark.
-- Every effect is idempotent and order-independent on its own (last-write-wins by event time, sets, min/max),
-- so a replay older than the dedupe window converges to the same state. Nothing below may raise after the
-- first write: inputs are validated by service/events.py, and this script only decodes them.
--
-- KEYS[1]  the space's event log (declared so that Redis Cluster routes the call to the space's shard)
-- ARGV     prefix, dedupe bucket, bucket width (s), lookback buckets, shard, field, event JSON, raw event,
--          rules JSON, received ms, log MINID
-- Layout of the profile hash: see service/keys.py.

local P = ARGV[1]
local bucket, bw, nb = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local shard, dfield = ARGV[5], ARGV[6]
local ev = cjson.decode(ARGV[7])
local raw = ARGV[8]
local rules = cjson.decode(ARGV[9])
local now = ARGV[10]
local minid = ARGV[11]
local NULL = cjson.null

local function pkey(pid) return P .. 'p:' .. pid end
local function ikey(t, v) return P .. 'i:' .. t .. ':' .. v end

-- 1. dedupe ---------------------------------------------------------------------------------------
for b = bucket - nb, bucket do
  if redis.call('HEXISTS', P .. 'dd:' .. b .. ':' .. shard, dfield) == 1 then return {'duplicate', ''} end
end
local function remember()
  local k = P .. 'dd:' .. bucket .. ':' .. shard
  redis.call('HSET', k, dfield, '1')
  if redis.call('HLEN', k) == 1 then redis.call('EXPIREAT', k, (bucket + nb + 1) * bw) end
end

local function log(pid)
  redis.call('XADD', KEYS[1], 'MINID', '~', minid, '*', 'p', pid, 'e', raw)
end

-- 2. suppression and GDPR deletion -----------------------------------------------------------------
local uid = ev.uid
if uid ~= '' and redis.call('SISMEMBER', P .. 'suppressed', uid) == 1 and ev.t ~= 'delete' then
  remember()
  return {'suppressed', ''}
end

if ev.t == 'delete' then
  redis.call('SADD', P .. 'suppressed', uid)
  local pid = redis.call('GET', ikey('user_id', uid))
  remember()
  if not pid then return {'deleted', ''} end
  local f = redis.call('HGETALL', pkey(pid))
  for i = 1, #f, 2 do
    local pre, rest = string.sub(f[i], 1, 2), string.sub(f[i], 3)
    if pre == 'x:' then
      redis.call('DEL', P .. 'i:' .. rest)
    elseif pre == 'r:' then
      redis.call('DEL', P .. 'mrg:' .. rest)
      redis.call('SADD', P .. 'forgotten', rest)
    end
  end
  redis.call('DEL', pkey(pid))
  redis.call('SADD', P .. 'forgotten', pid)
  redis.call('SADD', P .. 'dirty', pid)
  return {'deleted', pid}
end

-- 3. identity resolution -----------------------------------------------------------------------------
local ids = ev.ids
if ev.t == 'alias' and rules.alias and ev.al ~= NULL and ev.al then
  local kind = 'anonymous_id'
  if redis.call('EXISTS', ikey('user_id', ev.al)) == 1 then kind = 'user_id' end
  local present = false
  for _, id in ipairs(ids) do if id[1] == kind and id[2] == ev.al then present = true end end
  -- previousId goes last: when it conflicts (two user_ids), it is the identifier that is dropped.
  if not present then table.insert(ids, {kind, ev.al}) end
end

local owner = {}
for i, id in ipairs(ids) do owner[i] = redis.call('GET', ikey(id[1], id[2])) end

local function limit(t)
  local l = rules.limits[t]
  if l == nil then l = rules.default_limit end
  return l
end

local counts_of = {}   -- pid -> {type -> n}
local merges_of = {}   -- pid -> merges so far
local function load(pid)
  if counts_of[pid] then return end
  local m = redis.call('HMGET', pkey(pid), 'm:n', 'm:merges')
  counts_of[pid] = m[1] and cjson.decode(m[1]) or {}
  merges_of[pid] = tonumber(m[2]) or 0
end

local active = {}
for i = 1, #ids do active[i] = true end
local nactive = #ids
local mlist
while true do
  mlist = {}
  local seen = {}
  local counts, total, merges = {}, 0, 0
  for i = 1, #ids do
    if active[i] then
      local o = owner[i]
      if o then
        if not seen[o] then
          seen[o] = true
          mlist[#mlist + 1] = o
          load(o)
          for t, n in pairs(counts_of[o]) do counts[t] = (counts[t] or 0) + n; total = total + n end
          merges = merges + merges_of[o]
        end
      else
        local t = ids[i][1]
        counts[t] = (counts[t] or 0) + 1
        total = total + 1
      end
    end
  end
  local ok = nactive <= 1
  if not ok then
    ok = total <= rules.max_ids and (#mlist <= 1 or merges + #mlist - 1 <= rules.max_merges)
    if ok then
      for t, n in pairs(counts) do if n > limit(t) then ok = false; break end end
    end
  end
  if ok then break end
  for i = #ids, 1, -1 do   -- drop the lowest-priority identifier still in play, and match again
    if active[i] then active[i] = false; nactive = nactive - 1; break end
  end
end

-- 4. create or merge ------------------------------------------------------------------------------------
local function num(pid) return tonumber(string.sub(pid, 5)) or 0 end
local created = 0
local pid
if #mlist == 0 then
  pid = 'use_' .. redis.call('INCR', P .. 'seq')
  redis.call('HSET', pkey(pid), 'm:ca', now, 'm:n', '{}', 'm:merges', '0')
  counts_of[pid], merges_of[pid] = {}, 0
  created = 1
else
  pid = mlist[1]
  for _, o in ipairs(mlist) do if num(o) < num(pid) then pid = o end end
end
local S = pkey(pid)

local function fmt(n) return string.format('%.0f', n) end

-- Last write wins by (event time, then value) so every delivery order gives the same result.
local function put_traits(key, items, with_class)
  if #items == 0 then return end
  local fields = {}
  for _, it in ipairs(items) do
    fields[#fields + 1] = 't:' .. it[1]; fields[#fields + 1] = 'T:' .. it[1]
    if with_class then fields[#fields + 1] = 'c:' .. it[1] end
  end
  local cur = redis.call('HMGET', key, unpack(fields))
  local w, stride = {}, with_class and 3 or 2
  for j, it in ipairs(items) do
    local base = (j - 1) * stride
    local cv, cts = cur[base + 1], tonumber(cur[base + 2])
    local ts = it[3]
    if not cv or ts > cts or (ts == cts and it[2] > cv) then
      w[#w + 1] = 't:' .. it[1]; w[#w + 1] = it[2]
      w[#w + 1] = 'T:' .. it[1]; w[#w + 1] = fmt(ts)
      if with_class then
        if it[4] ~= '' then
          w[#w + 1] = 'c:' .. it[1]; w[#w + 1] = it[4]
        elseif cur[base + 3] then
          redis.call('HDEL', key, 'c:' .. it[1])
        end
      end
    end
  end
  if #w > 0 then redis.call('HSET', key, unpack(w)) end
end

local function earlier(ts_a, mid_a, ts_b, mid_b)
  return ts_b == nil or ts_a < ts_b or (ts_a == ts_b and mid_a < mid_b)
end

local function bits_or(a, b)
  local r = 0
  for s = 0, 47 do
    local p = 2 ^ s
    if math.floor(a / p) % 2 == 1 or math.floor(b / p) % 2 == 1 then r = r + p end
  end
  return r
end

local function merge_meta(fs, fm, ls, lm)
  local m = redis.call('HMGET', S, 'm:fs', 'm:fm', 'm:ls', 'm:lm')
  local w = {}
  if fs and earlier(fs, fm, tonumber(m[1]), m[2]) then w[#w + 1] = 'm:fs'; w[#w + 1] = fmt(fs); w[#w + 1] = 'm:fm'; w[#w + 1] = fm end
  if ls and (m[3] == false or earlier(tonumber(m[3]), m[4], ls, lm)) then
    w[#w + 1] = 'm:ls'; w[#w + 1] = fmt(ls); w[#w + 1] = 'm:lm'; w[#w + 1] = lm
  end
  if #w > 0 then redis.call('HSET', S, unpack(w)) end
end

local function merge_into(L)
  local f = redis.call('HGETALL', pkey(L))
  local lo = {}
  for i = 1, #f, 2 do lo[f[i]] = f[i + 1] end
  local traits = {}
  for k, v in pairs(lo) do
    local pre, rest = string.sub(k, 1, 2), string.sub(k, 3)
    if pre == 't:' then
      traits[#traits + 1] = {rest, v, tonumber(lo['T:' .. rest]) or 0, lo['c:' .. rest] or ''}
    elseif pre == 'x:' then
      redis.call('SET', P .. 'i:' .. rest, pid)
      redis.call('HSET', S, k, v)
    elseif pre == 'o:' or pre == 'r:' then
      redis.call('HSETNX', S, k, v)
    elseif pre == 'a:' then
      local cur = tonumber(redis.call('HGET', S, k)) or 0
      redis.call('HSET', S, k, fmt(bits_or(cur, tonumber(v) or 0)))
    elseif pre == 'g:' then
      local cur = tonumber(redis.call('HGET', S, k))
      if not cur or tonumber(v) < cur then redis.call('HSET', S, k, v) end
    end
  end
  put_traits(S, traits, true)
  merge_meta(tonumber(lo['m:fs']), lo['m:fm'], tonumber(lo['m:ls']), lo['m:lm'])
  local ca = redis.call('HGET', S, 'm:ca')
  if lo['m:ca'] and (not ca or tonumber(lo['m:ca']) < tonumber(ca)) then redis.call('HSET', S, 'm:ca', lo['m:ca']) end
  for t, n in pairs(counts_of[L]) do counts_of[pid][t] = (counts_of[pid][t] or 0) + n end
  merges_of[pid] = merges_of[pid] + merges_of[L] + 1
  redis.call('HSET', S, 'r:' .. L, '1')
  redis.call('DEL', pkey(L))
  redis.call('SET', P .. 'mrg:' .. L, pid)
  redis.call('SADD', P .. 'dirty', L)
end

local merged = 0
for _, o in ipairs(mlist) do
  if o ~= pid then merge_into(o); merged = merged + 1 end
end

-- 5. identifiers of this event --------------------------------------------------------------------------
local ts, mid = ev.ts, ev.mid
for i, id in ipairs(ids) do
  if active[i] then
    local field = 'x:' .. id[1] .. ':' .. id[2]
    if not owner[i] then
      redis.call('SET', ikey(id[1], id[2]), pid)
      redis.call('HSET', S, field, fmt(ts) .. '|' .. mid)
      counts_of[pid][id[1]] = (counts_of[pid][id[1]] or 0) + 1
    else
      local cur = redis.call('HGET', S, field)
      if cur then
        local bar = string.find(cur, '|', 1, true)
        if earlier(ts, mid, tonumber(string.sub(cur, 1, bar - 1)), string.sub(cur, bar + 1)) then
          redis.call('HSET', S, field, fmt(ts) .. '|' .. mid)
        end
      end
    end
  end
end
local n_json = '{}'
if next(counts_of[pid]) ~= nil then n_json = cjson.encode(counts_of[pid]) end
redis.call('HSET', S, 'm:n', n_json, 'm:merges', merges_of[pid], 'm:ua', now)

-- 6. effects ------------------------------------------------------------------------------------------------
local items = {}
for _, tr in ipairs(ev.tr) do items[#items + 1] = {tr[1], tr[2], ts, tr[3]} end
put_traits(S, items, true)

if ev.o ~= NULL then
  redis.call('HSETNX', S, 'o:' .. ev.o[1], fmt(ts) .. '|' .. ev.o[2] .. '|' .. ev.o[3])
end

if ev.a ~= NULL then
  local k = 'a:' .. ev.a[1] .. ':' .. ev.a[2]
  local cur = tonumber(redis.call('HGET', S, k)) or 0
  local p = 2 ^ ev.a[3]
  if math.floor(cur / p) % 2 == 0 then redis.call('HSET', S, k, fmt(cur + p)) end
end

if ev.g ~= NULL then
  local gid = ev.g[1]
  local cur = tonumber(redis.call('HGET', S, 'g:' .. gid))
  if not cur or ts < cur then redis.call('HSET', S, 'g:' .. gid, fmt(ts)) end
  local acct = {}
  for _, tr in ipairs(ev.g[2]) do acct[#acct + 1] = {tr[1], tr[2], ts, ''} end
  put_traits(P .. 'acct:' .. gid, acct, false)
end

merge_meta(ts, mid, ts, mid)

-- 7. log, dirty mark, dedupe record ---------------------------------------------------------------------
log(pid)
redis.call('SADD', P .. 'dirty', pid)
remember()
return {'ok', pid, created, merged}

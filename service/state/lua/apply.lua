-- Apply normalised Segment events to a space's profile state, in order, each on its own.
--
-- dedupe by messageId -> suppression -> identity resolution (match / create / merge under limits) ->
-- effects (traits, audiences, orders, channel activity, groups, metadata) -> event log -> dirty mark.
-- Every effect is idempotent and order-independent on its own (last-write-wins by time, sets, min/max),
-- so a replay older than the dedupe window converges to the same state. Nothing below may raise after the
-- first write: inputs are validated by service/spec/events.py, and this script only decodes them. (Redis does not
-- roll a script back: should an event still fail half-way, its dedupe record is taken back, the receiver keeps it
-- as a dead letter, and its replay converges because every effect is idempotent.)
--
-- The common case (a plain event whose identifiers are all known, on one profile) takes a fast path of ~10
-- commands: the dedupe lookups in two older buckets and an SADD (and SCARD) in the current one, a GET per
-- identifier, one HMGET and one HSET of the profile hash, the XADD, and the /events index's ZADD (none for an
-- event older than the index keeps); the index's trim and expiry are once per period and profile, the dirty marks
-- (one SADD) and the log's trim (by the first XADD) once per call. Limits are only consulted when an event brings
-- a new identifier or spans several profiles, and deletions only for an event at or before the space's latest.
--
-- Inputs, built by service/state/store.py (``Applier.call_args``) and service/spec/events.py. One call applies
-- one or more events of a space, in order, each on its own (an error in one is reported for it alone):
-- KEYS[1]  the space's event log (declared so that Redis Cluster routes the call to the space's shard)
-- ARGV[1]  "prefix \t dedupe bucket \t received ms \t log MINID \t mode \t generation \t index retention ms \t
--           older dedupe buckets \t dedupe expiry \t index trim bound \t index expiry \t index period": mode
--           'live' (the receiver, imports, dead letters) or 'reapply' (a replay of the event log: applied again
--           whether or not it was seen, and not logged a second time); generation '-' for the space's current one
--           (P..'gen'), else another ('' the original one): the one a rebuild writes (service/state/rebuild.py),
--           or one a GDPR erasure reaches (service/state/ops.py); index retention: how long
--           G..'ev:'pid keeps an event;
--           then, so that the script formats no number: the older dedupe buckets to look in (oldest first,
--           comma-separated), the current bucket's expiry (epoch s), the index's trim bound ('(' period start -
--           retention, ms), its expiry (period end + retention, ms) and the period (its start, ms): a profile's
--           index is trimmed and its expiry moved by its first event of a period (a sixteenth of the retention, at
--           most an hour; the profile's 'm:ix' holds the last one), as every event of the period would set the
--           same bounds; an event older than the trim bound (a backfill) is not indexed at all
-- ARGV[2]  rules JSON
-- then per event: dedupe shard (hex), dedupe id (a signed 64-bit integer), the event, raw event, and only in
--           'reapply' the log entry the event is ('-': none), so that the profile's event index points at it
-- Returns one line per event, joined by newlines into one string (cheaper for Redis to reply than a table per
-- event): 'status \t profile id \t created (0/1) \t merged', or 'error \t message' (``store._outcome``).
-- The event (written only by ``Event.script_payload``), in one of two forms:
--   plain, for the common call that carries no group, alias or erasure, no tab or \30 in its values and no ':'
--   in an identifier's type: 't \t ts \t mid \t uid \t activity field \t slot \t type:value \t ...' (the
--   activity field 'a:'channel':'day and the slot empty without activity; the identifiers by priority), split
--   with one string.match: no JSON to decode; with traits (no \30 or \31 in them), preceded by
--   '\30 received \31 stamp', '\31 name \31 JSON value \31 class' per trait and '\30', the stamp being the
--   traits' (ts, or ts '+' received - ts when received later); without, no receipt time (only traits need one);
--   with an order (no \29 in it, no \31 in its key), all that preceded by '\29 o \31 key \31 revenue \31
--   categories joined by \31 \29', or with a refund or cancellation by '\29 r \31 key \29';
--   else JSON, decoded as ``ev``:
--   t type, mid messageId, ts event time ms, uid userId or '', ids {{type, value}, ...} by priority,
--   tr {{name, JSON value, class}, ...}, o {order key, revenue text, categories joined by \31} or null,
--   a {channel, day, slot} or null, g {groupId, {{name, JSON value}, ...}} or null, al previousId or null,
--   rv order key of a refund or cancellation or null, rc received ms (>= ts), ep a profile id to erase (a delete
--   without userId, from ``persona-sync forget``) or null. ``ts`` is the effective time: the
--   event's own, never later than its receipt (a client clock in 2099 cannot pin a trait).
-- The rules JSON, decoded as ``rules`` (``IdentityRules.script_rules``): identifier priority, limits, blocked values,
--   merge and identifier caps, alias merging.
-- Keys of the space (prefix P, the space's hash tag; names as in service/spec/keys.py):
--   P..'ds:'bucket':'shard  dedupe buckets      P..'suppressed'  deleted userIds   P..'forgotten'  erased ids
--   P..'dd:sets'            the first dedupe bucket kept as sets (see below)
--   P..'deleted'            userId -> effective time of its latest delete (events at or before it are suppressed)
--   P..'forgotten:ids'      erased userIds, anonymousIds and emails, for the purge of the log and archive files
--   P..'forgotten:at'       such an id -> when a profile holding it was last erased (ms, Redis's clock): the
--                           purge removes the events naming it received until then
--   P..'erased'             'type:value' -> 'time|userId': every other identifier of an erased profile, the time of
--                           its latest erasure, and the deleted userId ('' for an erasure by profile id); events at
--                           or before it lose that identifier (and are suppressed when nothing else is left, or
--                           when it was their first identifier by priority)
--   G..'i:'type':'value     identifier index    G..'p:'pid       profile hash      G..'mrg:'pid    merged away
--   G..'seq'                profile counter     G..'acct:'group  account traits    P..'dirty'      refresh set
--   P..'dirty:accounts'     accounts whose traits changed: the refresh recomputes every member
--   G..'au:'group           the account's users: live profile ids, a sorted set by id (score 0), paged by lex
--   G..'ev:'pid             the profile's events for the Profile API's /events: a sorted set of log entry ids
--                           prefixed with the call type's letter, scored by event time, trimmed to the retention
--   G is P followed by the generation ('' or 'g<n>:'): a rebuild writes a new one while events go on to the
--   current one (P..'gen'), then switches by setting P..'gen'. Everything else (dedupe, deletion, log) is P's.
--   KEYS[1]                 event log (XADD; trimmed by MINID by the first XADD of each call)
-- Layout of the profile hash: see service/spec/keys.py.

-- Costs, per event of a known person: every redis.call, string.format, tonumber, table and string costs Redis CPU,
-- so what does not depend on the event is computed once per call (key prefixes; the times, as text, by the
-- caller), times stay the text they arrived as and are compared as text, the dirty marks and the log's trim are
-- once per call, and the functions of the general path are made only when an event needs them (every closure
-- is made again at each call of the script).
local HEADER = '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t'
  .. '([^\t]*)\t([^\t]*)\t([^\t]*)$'   -- the header's 12 parts
local h = {string.match(ARGV[1], HEADER)}
local P, bucket, now, minid = h[1], h[2], h[3], h[4]
local reapply = h[5] == 'reapply'
local G = h[6]
local keep_ms = tonumber(h[7])
local rebuilding = not (G == nil or G == '-')   -- not the current generation: no dirty marks
-- the generation, and for a live call since which bucket the dedupe records are sets (below): read together
local since = false
if rebuilding then
  G = P .. G
  if not reapply then since = redis.call('GET', P .. 'dd:sets') end
elseif reapply then
  G = P .. (redis.call('GET', P .. 'gen') or '')
else
  local r = redis.call('MGET', P .. 'gen', P .. 'dd:sets')
  G, since = P .. (r[1] or ''), r[2]
end
local NULL = cjson.null
local TOMBSTONE = '!'
local DUPLICATE, SUPPRESSED = 'duplicate\t', 'suppressed\t'
local function fmt(n) return string.format('%.0f', n) end

-- Lua's unpack passes at most ~8,000 values to a call: long argument lists (a profile with thousands of traits,
-- a merge of one, the dirty marks of a large call) go to Redis in slices (``general_path``'s hmget and sliced),
-- never failing half-way through an event
local SLICE = 4000   -- even: HSET's field-value pairs stay whole

-- Dedupe records: a bucket's ids are sets of signed 64-bit integers split in shards (P..'ds:'bucket':'shard),
-- which Redis keeps as intsets: 8 bytes an id, found by binary search. An older version kept them as hashes of
-- 8-byte fields (P..'dd:'bucket':'shard), whose lookup walks every field. P..'dd:sets' holds the first bucket
-- written as sets ('-': a space without a log yet, which never had the hashes). In that bucket and the next, while
-- a rolling upgrade may leave older processes running beside this one, ids are recorded in both forms (the older
-- processes read only the hashes), and the hashes of those buckets are read until they leave the window.
if not reapply and not since then
  since = redis.call('EXISTS', KEYS[1]) == 1 and bucket or '-'
  redis.call('SET', P .. 'dd:sets', since)
end
local legacy_upto = since and since ~= '-' and tonumber(since) + 1
local function legacy(b)   -- the key prefix of bucket b's hashes, if they may hold ids of the window
  return legacy_upto and tonumber(b) <= legacy_upto and P .. 'dd:' .. b .. ':'
end
-- once per call: the dedupe buckets' key prefixes (older ones, then the current one) and the current one's expiry,
-- the /events index's trim bound and expiry, whether the space has deleted userIds at all
local older_dd, older_legacy = {}, {}
for b in string.gmatch(h[8], '[^,]+') do
  older_dd[#older_dd + 1] = P .. 'ds:' .. b .. ':'
  older_legacy[#older_dd] = legacy(b)
end
local current_dd, current_legacy = P .. 'ds:' .. bucket .. ':', legacy(bucket)
local dd_expiry, index_from, index_expiry, period = h[9], h[10], h[11], h[12]
local index_oldest = string.sub(index_from, 2)   -- an event older than this (text, ms) is never indexed
local DELETED, ERASED, LATEST = P .. 'deleted', P .. 'erased', P .. 'deletions:latest'
local dirty = {}   -- profile ids to mark for the refresh: one SADD at the end of the call
local logged = false

-- Times are compared as the text they are stored as (ms since the epoch, written by this script or the caller):
-- two of the same length and sign compare as their digits, which spares the two strtod a tonumber costs.
local function before(a, b)   -- a < b, both integer texts
  if #a == #b and string.byte(a, 1) ~= 45 and string.byte(b, 1) ~= 45 then return a < b end
  return tonumber(a) < tonumber(b)
end

-- The latest deletion or erasure of the space (its effective time, text), or false for none: only an event at or
-- before it can be suppressed, so that live events (later than any deletion) look nothing up. Kept in
-- P..'deletions:latest' by ``delete``; worked out once from the records where it is missing (data of an older
-- version), as the greatest of their times.
local deletions_upto = false
if redis.call('EXISTS', DELETED, ERASED) > 0 then
  deletions_upto = redis.call('GET', LATEST)
  if not deletions_upto then
    local m = 0
    for _, v in ipairs(redis.call('HVALS', DELETED)) do m = math.max(m, tonumber(v) or 0) end
    for _, v in ipairs(redis.call('HVALS', ERASED)) do m = math.max(m, tonumber(string.match(v, '^[^|]*')) or 0) end
    deletions_upto = fmt(m)
    redis.call('SET', LATEST, deletions_upto)
  end
end
local function maybe_deleted(ts_text)   -- whether an event at ts_text is at or before a deletion of the space
  return deletions_upto and not before(deletions_upto, ts_text)
end

-- Log the event (the first entry of a call trims the log), add it to its profile's /events index, and mark the
-- profile dirty. ``index``: whether the event is indexed at all (``indexed``); ``retrim``: whether the index is also
-- trimmed and its expiry moved, which is once per period and profile (the profile's field 'm:ix' holds the period
-- it last was).
-- Returns the log entry, or false (a replay of an event that was not logged).
local function log_event(pid, raw, logged_as, letter, ts_text, index, retrim)
  local entry = false
  if not reapply then
    if logged or minid == '0' then
      entry = redis.call('XADD', KEYS[1], '*', 'p', pid, 'e', raw)
    else   -- the first entry of the call trims the log
      entry = redis.call('XADD', KEYS[1], 'MINID', '~', minid, '*', 'p', pid, 'e', raw)
    end
    logged = true
  elseif logged_as and logged_as ~= '-' then
    entry = logged_as
  end
  -- the Profile API's /events reads this index, then the entries it names
  if entry and index then
    local ek = G .. 'ev:' .. pid
    redis.call('ZADD', ek, ts_text, letter .. entry)
    if retrim then
      redis.call('ZREMRANGEBYSCORE', ek, '-inf', index_from)
      redis.call('PEXPIREAT', ek, index_expiry)
    end
  end
  if not rebuilding then dirty[#dirty + 1] = pid end
  return entry
end

-- Whether an event is added to its profile's /events index: it is logged (live, or a replay of a logged event),
-- and not older than the index keeps (a backfill would only be trimmed again at once); and whether the index is
-- also trimmed and its expiry moved: the profile's first indexed event of the period (``last``: its 'm:ix', the
-- period of the last trim), which then records this period in ``w``.
local function index_plan(w, ts_text, logged_as, last)
  local index = keep_ms ~= nil and (not reapply or (logged_as ~= nil and logged_as ~= '-'))
      and not before(ts_text, index_oldest)
  local retrim = index and last ~= period
  if retrim then w[#w + 1] = 'm:ix'; w[#w + 1] = period end
  return index, retrim
end

-- The effects both paths write for the event itself, into the profile write ``w``. An identifier's first
-- sighting ``c`` ('time|messageId', as stored) moves to the event if the event came before it:
local function sighting_writes(w, field, c, ts_text, mid)
  local bar = string.find(c, '|', 1, true)
  local cts = string.sub(c, 1, bar - 1)
  if (cts == ts_text and mid < string.sub(c, bar + 1)) or (cts ~= ts_text and before(ts_text, cts)) then
    w[#w + 1] = field; w[#w + 1] = ts_text .. '|' .. mid
  end
end

-- the channel's activity bit for the slot, in the day's field (``stored``: its value as read)
local function activity_writes(w, afield, stored, slot)
  local bits = tonumber(stored) or 0
  local p = 2 ^ slot
  if math.floor(bits / p) % 2 == 0 then w[#w + 1] = afield; w[#w + 1] = fmt(bits + p) end
end

-- first and last seen, against the stored times ``fs`` and ``ls`` (text; nil: none yet) of the profile hash
-- ``S``: their messageIds are read only for a tie at the same millisecond
local function seen_writes(w, S, fs, ls, ts_text, mid)
  if not fs or (fs ~= ts_text and before(ts_text, fs))
      or (fs == ts_text and mid < (redis.call('HGET', S, 'm:fm') or '')) then
    w[#w + 1] = 'm:fs'; w[#w + 1] = ts_text; w[#w + 1] = 'm:fm'; w[#w + 1] = mid
  end
  if not ls or (ls ~= ts_text and before(ls, ts_text))
      or (ls == ts_text and (redis.call('HGET', S, 'm:lm') or '') < mid) then
    w[#w + 1] = 'm:ls'; w[#w + 1] = ts_text; w[#w + 1] = 'm:lm'; w[#w + 1] = mid
  end
end

-- Which write wins, for both paths: traits' last write (identify, Engage's audiences and computed traits), an
-- order's version, a refund's mark. Made on the first event that needs them, apart from the general path, so that
-- a known person's identify or order takes the fast path without the cost of making the general path's functions.
local wins_fns = nil
local function wins_path()
  if wins_fns then return wins_fns end
  -- An order's version ('time|revenue|categories', as stored) ``v`` replaces the stored ``c`` (nil or false:
  -- none): the later event wins, at the same millisecond the greater text (an order sent twice, or corrected,
  -- keeps the same version in any order). A refund's mark ('time') keeps the earliest.
  local function order_wins(c, v)
    if not c then return true end
    local cts, vts = string.match(c, '^[^|]*'), string.match(v, '^[^|]*')
    if cts == vts then return v > c end
    return before(cts, vts)
  end
  local function refund_wins(c, ts_text) return not c or before(ts_text, c) end
  -- The event's own order write into ``w``, for both paths: ``o`` is {key, revenue, categories} for an order (its
  -- version in ``field``, 'o:'key), {key} for a refund or cancellation (its mark, 'q:'key: decoding leaves a
  -- marked order out, whichever arrived first); ``stored``: the field's value as read.
  local function order_writes(w, field, stored, ts_text, o)
    if o[2] then
      local v = ts_text .. '|' .. o[2] .. '|' .. o[3]
      if order_wins(stored, v) then w[#w + 1] = field; w[#w + 1] = v end
    elseif refund_wins(stored, ts_text) then
      w[#w + 1] = field; w[#w + 1] = ts_text
    end
  end

  -- A write's stamp: its effective time, and how much later it was received ('<ts>' or '<ts>+<received - ts>').
  local function stamp(t, r)
    if r > t then return fmt(t) .. '+' .. fmt(r - t) end
    return fmt(t)
  end
  local function unstamp(s)
    if not s then return 0, 0 end
    local plus = string.find(s, '+', 1, true)
    if not plus then local t = tonumber(s) or 0; return t, t end
    local t = tonumber(string.sub(s, 1, plus - 1)) or 0
    return t, t + (tonumber(string.sub(s, plus + 1)) or 0)
  end

  -- Last write wins by effective time; at the same millisecond the later receipt wins, then the greater value,
  -- then (the same value: an identify and Engage's audience event) the greater class, so that any order agrees.
  -- The receipt time travels with the event (Segment's receivedAt, or ours written into the logged event), so
  -- every delivery and replay order gives the same result.
  -- cur: field -> current value; items: {name, json, ts, class, received[, stamp(ts, received) as text]};
  -- appends winning writes to w.
  local function lww(cur, items, w, with_class, key)
    for _, it in ipairs(items) do
      local cv = cur['t:' .. it[1]]
      local ts, r = it[3], it[5]
      local cts, cr = unstamp(cur['T:' .. it[1]])
      if not cv or ts > cts or (ts == cts and (r > cr or (r == cr and (it[2] > cv
          or (with_class and it[2] == cv and it[4] > (cur['c:' .. it[1]] or '')))))) then
        w[#w + 1] = 't:' .. it[1]; w[#w + 1] = it[2]
        w[#w + 1] = 'T:' .. it[1]; w[#w + 1] = it[6] or stamp(ts, r)
        if with_class then
          if it[4] ~= '' then
            w[#w + 1] = 'c:' .. it[1]; w[#w + 1] = it[4]
          elseif cur['c:' .. it[1]] then
            redis.call('HDEL', key, 'c:' .. it[1])
          end
        end
      end
    end
  end

  local function trait_fields(items, fields, with_class)
    for _, it in ipairs(items) do
      fields[#fields + 1] = 't:' .. it[1]; fields[#fields + 1] = 'T:' .. it[1]
      if with_class then fields[#fields + 1] = 'c:' .. it[1] end
    end
  end

  -- The plain form's traits section (see the header: receipt \31 stamp, then \31 name \31 JSON value \31 class
  -- per trait) as ``lww``'s items for an event at ``ts``; and the receipt time.
  local TRAITS = '^([^\31]*)\31([^\31]*)(.*)$'
  local function plain_traits(tsec, ts)
    local rc_text, st, body = string.match(tsec, TRAITS)
    local rc = tonumber(rc_text)
    local items = {}
    for name, json, class in string.gmatch(body, '\31([^\31]*)\31([^\31]*)\31([^\31]*)') do
      items[#items + 1] = {name, json, ts, class, rc, st}
    end
    return items, rc
  end

  wins_fns = {unstamp = unstamp, lww = lww, trait_fields = trait_fields, plain_traits = plain_traits,
              order_wins = order_wins, refund_wins = refund_wins, order_writes = order_writes}
  return wins_fns
end

-- The general path (identity resolution, merges, traits, orders, groups, deletion): its functions are made on
-- the first event that needs them. Each closure costs Redis CPU at every call of the script, and most calls
-- are plain events of known people, which the fast path (``apply_plain``) serves alone.
local general = nil
local function general_path()
  if general then return general end
  local tp = wins_path()
  local unstamp, lww, trait_fields, plain_traits = tp.unstamp, tp.lww, tp.trait_fields, tp.plain_traits
  local order_wins, refund_wins, order_writes = tp.order_wins, tp.refund_wins, tp.order_writes
  local rules_cache = nil
  local function the_rules()   -- decoded once per call, and only when an event needs them
    if not rules_cache then rules_cache = cjson.decode(ARGV[2]) end
    return rules_cache
  end
  local NO_TRAITS = {}
  local function hmget(key, fields)   -- HMGET of ``fields``, in slices
    local n = #fields
    if n <= SLICE then return redis.call('HMGET', key, unpack(fields)) end
    local out = {}
    for i = 1, n, SLICE do
      local part = redis.call('HMGET', key, unpack(fields, i, math.min(i + SLICE - 1, n)))
      for j = 1, #part do out[#out + 1] = part[j] end
    end
    return out
  end
  local function sliced(cmd, key, args)   -- HSET, SADD, ZREM of ``args``, in slices
    local n = #args
    if n <= SLICE then return redis.call(cmd, key, unpack(args)) end
    for i = 1, n, SLICE do redis.call(cmd, key, unpack(args, i, math.min(i + SLICE - 1, n))) end
  end
  local function pkey(pid) return G .. 'p:' .. pid end
  local function ikey(t, v) return G .. 'i:' .. t .. ':' .. v end

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

  local function read(key, fields)
    local cur = {}
    if #fields == 0 then return cur end
    local vals = hmget(key, fields)
    for i = 1, #fields do if vals[i] then cur[fields[i]] = vals[i] end end
    return cur
  end

  -- first and last seen of a merged profile: fs/fm and ls/lm are the time (text, as stored) and messageId of each
  local function meta_writes(cur, w, fs, fs_text, fm, ls, ls_text, lm)
    if fs and earlier(fs, fm, tonumber(cur['m:fs']), cur['m:fm']) then
      w[#w + 1] = 'm:fs'; w[#w + 1] = fs_text; w[#w + 1] = 'm:fm'; w[#w + 1] = fm
    end
    if ls and (not cur['m:ls'] or earlier(tonumber(cur['m:ls']), cur['m:lm'], ls, lm)) then
      w[#w + 1] = 'm:ls'; w[#w + 1] = ls_text; w[#w + 1] = 'm:lm'; w[#w + 1] = lm
    end
  end

  -- The JSON form as ``ev`` (see the header); ``ts_text`` is ``ts`` as text, ``af`` the activity's profile field.
  local function decode_json(s)
    local ev = cjson.decode(s)
    ev.ts_text = fmt(ev.ts)
    if ev.a ~= NULL then ev.af = 'a:' .. ev.a[1] .. ':' .. ev.a[2]; ev.slot = ev.a[3] end
    return ev
  end

  -- The plain form's parts as ``ev``, for the events the fast path hands on (new identifiers, several profiles, a
  -- deletion). ``idtexts``: 'type:value' each (a type with ':' in it goes as JSON); ``tsec``: the traits section,
  -- or false; ``order``: the order section's parts ({key, revenue, categories}, or {key} for a reversal), or false.
  local function plain_ev(t, ts_text, mid, uid, afield, slot, idtexts, tsec, order)
    local ids = {}
    for i = 1, #idtexts do
      local tv = idtexts[i]
      local c = string.find(tv, ':', 1, true)
      ids[i] = {string.sub(tv, 1, c - 1), string.sub(tv, c + 1)}
    end
    -- no receipt time without traits: only they need it
    local ev = {t = t, ts = tonumber(ts_text), ts_text = ts_text, mid = mid, uid = uid, ids = ids, tr = NO_TRAITS,
                o = NULL, a = NULL, g = NULL, al = NULL, rv = NULL, ep = NULL}
    if tsec then
      local items, rc = plain_traits(tsec, ev.ts)
      local tr = {}
      for i, it in ipairs(items) do tr[i] = {it[1], it[2], it[4]} end
      ev.tr, ev.rc = tr, rc
    end
    if afield ~= '' then ev.af = afield; ev.slot = tonumber(slot) end
    if order and order[2] then ev.o = order elseif order then ev.rv = order[1] end
    return ev
  end

  local function num(pid) return tonumber(string.sub(pid, 5)) or 0 end

  -- A deletion or erasure at ts_text: the space's latest moves (``deletions_upto``).
  local function deleted_until(ts_text)
    if not deletions_upto or before(deletions_upto, ts_text) then
      deletions_upto = ts_text
      redis.call('SET', LATEST, ts_text)
    end
  end

  -- Whether an erasure's record ``v`` in P..'erased' ('time|userId', as written by ``delete``) covers an event at
  -- ``ts_text``: the event is at or before the erasure.
  local function erased_by(v, ts_text)
    local bar = string.find(v, '|', 1, true)
    return not before(bar and string.sub(v, 1, bar - 1) or v, ts_text)
  end

  -- pid -> {type -> n} and pid -> merges so far, of the profiles one event involves
  local function load(pid, counts_of, merges_of)
    if counts_of[pid] then return end
    local m = redis.call('HMGET', pkey(pid), 'm:n', 'm:merges')
    counts_of[pid] = m[1] and cjson.decode(m[1]) or {}
    merges_of[pid] = tonumber(m[2]) or 0
  end

  -- Merge profile L into the survivor pid (hash S): identifiers, traits by last write, activity bits, orders, groups.
  local function merge_into(L, pid, S, counts_of, merges_of)
    local f = redis.call('HGETALL', pkey(L))
    local lo = {}
    for i = 1, #f, 2 do lo[f[i]] = f[i + 1] end
    local traits, fields = {}, {'m:fs', 'm:fm', 'm:ls', 'm:lm', 'm:ca'}
    for k, v in pairs(lo) do
      local pre, rest = string.sub(k, 1, 2), string.sub(k, 3)
      if pre == 't:' then
        local t, r = unstamp(lo['T:' .. rest])
        traits[#traits + 1] = {rest, v, t, lo['c:' .. rest] or '', r}
      elseif pre == 'a:' or pre == 'g:' or pre == 'o:' or pre == 'q:' then
        fields[#fields + 1] = k
      elseif pre == 'x:' then
        redis.call('SET', G .. 'i:' .. rest, pid)
      elseif pre == 'r:' then   -- what merged into L earlier points at the survivor, not along a chain
        redis.call('SET', G .. 'mrg:' .. rest, pid)
      end
    end
    trait_fields(traits, fields, true)
    local cur = read(S, fields)
    local w = {}
    for k, v in pairs(lo) do
      local pre = string.sub(k, 1, 2)
      if pre == 'x:' or pre == 'r:' or (pre == 'o:' and order_wins(cur[k], v))
          or (pre == 'q:' and refund_wins(cur[k], v)) then
        w[#w + 1] = k; w[#w + 1] = v
      elseif pre == 'a:' then
        w[#w + 1] = k; w[#w + 1] = fmt(bits_or(tonumber(cur[k]) or 0, tonumber(v) or 0))
      elseif pre == 'g:' then
        if not cur[k] or tonumber(v) < tonumber(cur[k]) then w[#w + 1] = k; w[#w + 1] = v end
        local au = G .. 'au:' .. string.sub(k, 3)   -- the account's member is now the survivor
        redis.call('ZREM', au, L)
        redis.call('ZADD', au, 0, pid)
      end
    end
    lww(cur, traits, w, true, S)
    meta_writes(cur, w, tonumber(lo['m:fs']), lo['m:fs'], lo['m:fm'], tonumber(lo['m:ls']), lo['m:ls'], lo['m:lm'])
    if lo['m:ca'] and (not cur['m:ca'] or tonumber(lo['m:ca']) < tonumber(cur['m:ca'])) then
      w[#w + 1] = 'm:ca'; w[#w + 1] = lo['m:ca']
    end
    w[#w + 1] = 'r:' .. L; w[#w + 1] = '1'
    sliced('HSET', S, w)
    for t, n in pairs(counts_of[L]) do counts_of[pid][t] = (counts_of[pid][t] or 0) + n end
    merges_of[pid] = merges_of[pid] + merges_of[L] + 1
    redis.call('DEL', pkey(L))
    redis.call('SET', G .. 'mrg:' .. L, pid)
    if not rebuilding then dirty[#dirty + 1] = L end
  end

  -- When a profile is erased, by Redis's clock (that of the log's entry ids, which the purge compares with it):
  -- ms, as text
  local function erased_at()
    local t = redis.call('TIME')
    return t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
  end

  -- Record identifier ``x`` ('type:value') as erased at ``ts_text`` with the deleted userId ``uid`` ('' for none),
  -- unless a later erasure already covers it.
  local function mark_erased(x, ts_text, uid)
    local prev = redis.call('HGET', ERASED, x)
    if not prev or not erased_by(prev, ts_text) then redis.call('HSET', ERASED, x, ts_text .. '|' .. uid) end
  end

  -- Erase profile ``pid`` as of ``ts_text``: its hash, identifiers, merged-away ids, event index and account
  -- memberships. ``uid``: the deleted userId it is erased for ('' for none); ``record``: keep its identifiers for
  -- a rebuild that is running (an erasure that no userId's deletion record covers).
  local function erase(pid, uid, ts_text, record)
    local f = redis.call('HGETALL', pkey(pid))
    local erased, groups, idents = {pid}, {}, {}
    for i = 1, #f, 2 do
      local pre, rest = string.sub(f[i], 1, 2), string.sub(f[i], 3)
      if pre == 'r:' then erased[#erased + 1] = rest elseif pre == 'g:' then groups[#groups + 1] = rest end
    end
    for _, e in ipairs(erased) do redis.call('DEL', G .. 'ev:' .. e) end
    for _, g in ipairs(groups) do sliced('ZREM', G .. 'au:' .. g, erased) end
    for i = 1, #f, 2 do
      local pre, rest = string.sub(f[i], 1, 2), string.sub(f[i], 3)
      if pre == 'x:' then
        redis.call('DEL', G .. 'i:' .. rest)
        -- the log, dead letters and archive files keep events naming the person by userId, anonymousId or email
        -- (an event that reached the profile by its email alone): the purge job removes them, those received
        -- until now (the profile is erased as it stands: P..'forgotten:at') and those at or before the erasure
        local kind, value = string.match(rest, '^([^:]+):(.*)$')
        if kind == 'user_id' or kind == 'anonymous_id' or kind == 'email' then
          redis.call('SADD', P .. 'forgotten:ids', value)
          if not rebuilding then redis.call('HSET', P .. 'forgotten:at', value, erased_at()) end
        end
        if record then redis.call('SADD', P .. 'rebuild:erased', rest) end
        if not (kind == 'user_id' and value == uid) then idents[#idents + 1] = rest end
      elseif pre == 'r:' then
        redis.call('DEL', G .. 'mrg:' .. rest)
        redis.call('SADD', P .. 'forgotten', rest)
      end
    end
    -- every other identifier of the profile: its events at or before the erasure (a late retry, a replay read
    -- before the purge, an import) lose it, and stay out when nothing else identifies them; the record names the
    -- deleted userId ('' for none), so that lifting its suppression lifts these too (service/state/ops.py). An
    -- erasure in another generation follows one of the current generation's, which recorded it.
    if not rebuilding then
      for _, x in ipairs(idents) do mark_erased(x, ts_text, uid) end
      if #idents > 0 then deleted_until(ts_text) end
    end
    redis.call('DEL', pkey(pid))
    redis.call('SADD', P .. 'forgotten', pid)
    if record then redis.call('EXPIRE', P .. 'rebuild:erased', 3600) end
    if not rebuilding then dirty[#dirty + 1] = pid end
  end

  local function rebuild_running()
    return not rebuilding and redis.call('HGET', P .. 'rebuild', 'state') == 'running'
  end

  -- An event of a deleted userId stamped at or before its deletion (``at``, its time as text) is suppressed. Had
  -- it arrived before the deletion, it would have joined its anonymousId's profile to the deleted one, and the
  -- deletion would have erased that too: the person's activity from before they logged in. So that profile is
  -- erased now, when it is plainly only that: no userId or email on it (someone's, whom merge protection or a limit
  -- may have kept apart), nothing in it after the deletion (a later visit is not the deleted person's to lose), and
  -- no rebuild under way (its new generation may hold that browser elsewhere). An anonymousId of nobody is
  -- recorded as erased as of the deletion, as the deletion would have recorded it. Returns the profile erased, or ''.
  local function erase_linked(uid, ids, at)
    if rebuild_running() then return '' end
    local erased = ''
    for _, id in ipairs(ids) do
      if id[1] == 'anonymous_id' then
        local o = redis.call('GET', ikey(id[1], id[2]))
        if o and o ~= TOMBSTONE then
          local m = redis.call('HMGET', pkey(o), 'm:n', 'm:ls')
          local n = m[1] and cjson.decode(m[1]) or {}
          if (n.user_id or 0) == 0 and (n.email or 0) == 0 and m[2] and not before(at, m[2]) then
            erase(o, uid, at, false)
            erased = o
          end
        elseif not o and not rebuilding then
          mark_erased(id[1] .. ':' .. id[2], at, uid)
        end
      end
    end
    return erased
  end

  -- GDPR deletion, as Segment's DELETE_ONLY: the profile is erased, and the userId's events at or before the
  -- deletion (late retries, replays) are suppressed; later ones build a new profile. The userId's index entry
  -- becomes the tombstone '!' until then, and P..'deleted' keeps the deletion time (an entry of older versions
  -- without one suppresses every later event, as it did then).
  local function delete(ev)
    local uid, ts = ev.uid, ev.ts
    local pid
    -- while a rebuild runs, it may have applied this profile's events to its new generation already, or may yet
    -- (the purge of the log is a job): it erases them there too once it has switched, by the record kept here
    -- (P..'rebuild:deleted' for a userId, deleted again as of its time; P..'rebuild:erased' for the identifiers
    -- of an erasure by profile id), kept an hour past the rebuild's last sign of life
    local running = rebuild_running()
    if uid ~= '' then
      if running then
        redis.call('SADD', P .. 'rebuild:deleted', uid)
        redis.call('EXPIRE', P .. 'rebuild:deleted', 3600)
      end
      redis.call('SADD', P .. 'suppressed', uid)
      redis.call('SADD', P .. 'forgotten:ids', uid)
      local prior = tonumber(redis.call('HGET', DELETED, uid))
      if not prior or ts > prior then redis.call('HSET', DELETED, uid, ev.ts_text) end
      deleted_until(ev.ts_text)
      pid = redis.call('GET', ikey('user_id', uid))
      if pid == TOMBSTONE then pid = false end
      if not pid then
        redis.call('SET', ikey('user_id', uid), TOMBSTONE)
        return 'deleted\t'
      end
      -- a profile whose first event came after the deletion is a returning user's (an earlier delivery of this
      -- delete, which Segment retries, or an older one arriving late, erased what came before): it stays
      local fs = redis.call('HGET', pkey(pid), 'm:fs')
      if fs and before(ev.ts_text, fs) then return 'deleted\t' end
    else   -- an erasure by profile id (``persona-sync forget`` of a profile without a userId): nothing to suppress
      pid = ev.ep
      if pid == nil or pid == NULL or redis.call('EXISTS', pkey(pid)) == 0 then return 'deleted\t' end
    end
    erase(pid, uid, ev.ts_text, uid == '' and running)   -- by profile id while a rebuild runs: its identifiers
    if uid ~= '' then redis.call('SET', ikey('user_id', uid), TOMBSTONE) end
    return 'deleted\t' .. pid
  end

  -- A limit with a sliding window (``rules.windows``: type -> ms, `anonymous_id:5:weekly`; '*' for the types
  -- without a limit of their own) holds in every stretch of that length that holds the event: the values of its
  -- type that the profile got in such a stretch (each value's first sighting, 'time|mid' in its 'x:' field),
  -- before or after the event, with the event's new ones, are at most the limit. So events that arrive out of
  -- order (an import newest first) keep to it too, and a value is refused only where some stretch would pass it.
  -- ``windowed``: type -> the first sightings within a window's length of the event, read once per profile and
  -- event (``cache``), and only on this path; ``busiest``: the most values in one such stretch.
  local function window_of(t, rules, wins)
    local w = wins[t]
    if w == nil and rules.limits[t] == nil then w = wins['*'] end
    return w
  end
  local function windowed(pid, ts, rules, wins, cache)
    if cache[pid] then return cache[pid] end
    local out = {}
    local f = redis.call('HGETALL', pkey(pid))
    for i = 1, #f, 2 do
      local t = string.match(f[i], '^x:([^:]*):')
      local w = t and window_of(t, rules, wins)
      if w then
        local at = tonumber(string.match(f[i + 1], '^[^|]*')) or 0
        if at > ts - w and at < ts + w then
          out[t] = out[t] or {}
          table.insert(out[t], at)
        end
      end
    end
    cache[pid] = out
    return out
  end
  -- stretches [a, a + w) with ts in them: a from ts - w + 1 to ts. A stretch's count grows only where it reaches a
  -- sighting, so the busiest starts at ts - w + 1 or ends at a sighting at or after ts (a = that sighting - w + 1)
  local function busiest(times, new, ts, w)
    local best, starts = new, {ts - w + 1}
    for _, at in ipairs(times) do if at >= ts then starts[#starts + 1] = at - w + 1 end end
    for _, a in ipairs(starts) do
      local n = new
      for _, at in ipairs(times) do if at >= a and at < a + w then n = n + 1 end end
      if n > best then best = n end
    end
    return best
  end

  -- Which profiles the event's identifiers match, once identifiers past the limits are dropped: returns the
  -- profiles to merge (lowest id survives) and which identifiers stay active. ``ts``: the event's time, for the
  -- limits with a window.
  local function resolve(ids, owner, counts_of, merges_of, ts)
    local active = {}
    for i = 1, #ids do active[i] = true end
    local rules = the_rules()
    local wins = rules.windows or {}
    if next(wins) == nil then wins = false end
    local wcache = {}
    local nactive = #ids
    while true do
      local mlist, seen, counts, total, merges, new = {}, {}, {}, 0, 0, 0
      local near = {}   -- windowed type -> first sightings near the event, of every profile matched
      for i = 1, #ids do
        if active[i] then
          local o = owner[i]
          if o then
            if not seen[o] then
              seen[o] = true
              mlist[#mlist + 1] = o
              load(o, counts_of, merges_of)
              local wc = wins and windowed(o, ts, rules, wins, wcache)
              for t, n in pairs(counts_of[o]) do
                if wc and window_of(t, rules, wins) then
                  local list = near[t] or {}
                  for _, at in ipairs(wc[t] or {}) do list[#list + 1] = at end
                  near[t] = list
                else
                  counts[t] = (counts[t] or 0) + n
                end
                total = total + n   -- the identifier cap counts every value, whenever added
              end
              merges = merges + merges_of[o]
            end
          else
            local t = ids[i][1]
            counts[t] = (counts[t] or 0) + 1
            total = total + 1
            new = new + 1
          end
        end
      end
      for t, list in pairs(near) do counts[t] = busiest(list, counts[t] or 0, ts, window_of(t, rules, wins)) end
      local ok, fits = nactive <= 1, false
      if not ok then
        fits = #mlist <= 1 or merges + #mlist - 1 <= rules.max_merges
        if fits then
          for t, n in pairs(counts) do
            local l = rules.limits[t]
            if l == nil then l = rules.default_limit end
            if n > l then fits = false; break end
          end
        end
        ok = fits and total <= rules.max_ids
        fits = fits and total - new <= rules.max_ids   -- the known profiles fit: only new identifiers overflow
      end
      if ok then return mlist, active end
      -- drop the lowest-priority identifier still in play, and match again; when only the new identifiers pass
      -- the identifier cap, a new one first: at the cap an event still attaches to its profile, adding none
      local drop = false
      if fits then
        for i = #ids, 1, -1 do
          if active[i] and not owner[i] then drop = i; break end
        end
      end
      if not drop then
        for i = #ids, 1, -1 do
          if active[i] then drop = i; break end
        end
      end
      active[drop] = false
      nactive = nactive - 1
    end
  end

  -- Steps 2 to 6 of one event, decoded as ``ev`` (either form), once its dedupe record is written: the general
  -- path, for every event the fast path (``apply_plain``) does not take. Returns its outcome line.
  local function apply_ev(ev, raw, logged_as)
    -- 2. GDPR deletion ----------------------------------------------------------------------------------------
    if ev.t == 'delete' then return delete(ev) end

    -- 3. identity resolution (and suppression of deleted userIds) ----------------------------------------------
    local uid = ev.uid
    local ts, ts_text, mid, rc = ev.ts, ev.ts_text, ev.mid, ev.rc or ev.ts
    local ids = ev.ids
    if ev.t == 'alias' and ev.al ~= NULL and ev.al and the_rules().alias then
      local kind = 'anonymous_id'
      local known = redis.call('GET', ikey('user_id', ev.al))
      if known then kind = 'user_id' end
      -- a deleted userId: no event stamped up to its deletion links to it again, even once it has a new profile
      if known == TOMBSTONE or (known and maybe_deleted(ev.ts_text)) then
        local at = tonumber(redis.call('HGET', DELETED, ev.al))
        if (known == TOMBSTONE and not at) or (at and ev.ts <= at) then kind = false end
      end
      local present = not kind
      for _, id in ipairs(ids) do if id[1] == kind and id[2] == ev.al then present = true end end
      -- previousId goes last: when it conflicts (two user_ids), it is the identifier that is dropped.
      if not present then table.insert(ids, {kind, ev.al}) end
    end

    local deleted_at = false
    local checked = maybe_deleted(ts_text)
    local deleted_text = uid ~= '' and checked and redis.call('HGET', DELETED, uid)
    if deleted_text then deleted_at = tonumber(deleted_text) end
    if deleted_at and ts <= deleted_at then return SUPPRESSED .. erase_linked(uid, ids, deleted_text) end
    if checked and #ids > 0 then   -- identifiers of erased profiles, at or before their erasure: dropped
      local texts = {}
      for i, id in ipairs(ids) do texts[i] = id[1] .. ':' .. id[2] end
      local e = redis.call('HMGET', ERASED, unpack(texts))
      local kept = {}
      for i, id in ipairs(ids) do
        local gone = e[i] and erased_by(e[i], ts_text)
        if not gone and id[1] == 'user_id' and id[2] ~= uid then   -- a deleted userId named by context.externalIds
          local at = tonumber(redis.call('HGET', DELETED, id[2]))
          gone = at and ts <= at
        end
        if not gone then kept[#kept + 1] = id end
      end
      -- nothing left, or its first identifier by priority dropped (an erased email beside a browser never seen):
      -- the erased person's event, traits and all
      if #kept == 0 or kept[1] ~= ids[1] then return SUPPRESSED end
      ids = kept
    end

    local owner, distinct, ndistinct, unmapped = {}, {}, 0, 0
    for i, id in ipairs(ids) do
      local o = redis.call('GET', ikey(id[1], id[2]))
      if o == TOMBSTONE then
        if id[1] == 'user_id' and id[2] == uid then
          if not checked then deleted_at = tonumber(redis.call('HGET', DELETED, uid)) end
          if not deleted_at then
            return SUPPRESSED   -- deleted by an older version, which kept no time: suppressed for ever, as then
          end
        end
        o = false   -- deleted before this event (a new profile), or an alias previousId that was erased
      end
      owner[i] = o
      if o then
        if not distinct[o] then distinct[o] = true; ndistinct = ndistinct + 1 end
      else
        unmapped = unmapped + 1
      end
    end

    local counts_of, merges_of = {}, {}
    local mlist, active
    if unmapped == 0 and ndistinct == 1 then
      mlist = {owner[1]}                 -- fast path: a known person, nothing new to check
    elseif #ids == 1 then
      mlist = owner[1] and {owner[1]} or {}
    else
      mlist, active = resolve(ids, owner, counts_of, merges_of, ts)
    end

    -- 4. create or merge ------------------------------------------------------------------------------------
    local created = 0
    local pid
    if #mlist == 0 then
      pid = 'use_' .. redis.call('INCR', G .. 'seq')
      counts_of[pid], merges_of[pid] = {}, 0
      created = 1
    else
      pid = mlist[1]
      for i = 2, #mlist do if num(mlist[i]) < num(pid) then pid = mlist[i] end end
    end
    local S = pkey(pid)

    local merged = 0
    for _, o in ipairs(mlist) do
      if o ~= pid then merge_into(o, pid, S, counts_of, merges_of); merged = merged + 1 end
    end

    -- 5. the event's identifiers and effects: one read, one write ----------------------------------------------
    local fields = {'m:fs', 'm:ls', 'm:ix'}   -- first and last seen without their messageIds (seen_writes)
    local items = {}
    local st = ts_text   -- the event's stamp, formatted once for all its traits
    if rc > ts then st = ts_text .. '+' .. fmt(rc - ts) end
    for _, tr in ipairs(ev.tr) do items[#items + 1] = {tr[1], tr[2], ts, tr[3], rc, st} end
    trait_fields(items, fields, true)
    local afield, ofield, gfield, rfield
    if ev.af then afield = ev.af; fields[#fields + 1] = afield end
    if ev.o ~= NULL then ofield = 'o:' .. ev.o[1]; fields[#fields + 1] = ofield end
    if ev.g ~= NULL then gfield = 'g:' .. ev.g[1]; fields[#fields + 1] = gfield end
    if ev.rv ~= NULL and ev.rv then rfield = 'q:' .. ev.rv; fields[#fields + 1] = rfield end
    local xfields = {}
    for i, id in ipairs(ids) do
      xfields[i] = 'x:' .. id[1] .. ':' .. id[2]
      if (not active or active[i]) and owner[i] then fields[#fields + 1] = xfields[i] end
    end
    local cur = read(S, fields)
    local w = {'m:ua', now}
    if created == 1 then w[#w + 1] = 'm:ca'; w[#w + 1] = now end

    local new_ids = false
    for i, id in ipairs(ids) do
      if not active or active[i] then
        local field = xfields[i]
        if not owner[i] then
          redis.call('SET', ikey(id[1], id[2]), pid)
          w[#w + 1] = field; w[#w + 1] = ts_text .. '|' .. mid
          if not counts_of[pid] then load(pid, counts_of, merges_of) end
          counts_of[pid][id[1]] = (counts_of[pid][id[1]] or 0) + 1
          new_ids = true
        elseif cur[field] then
          sighting_writes(w, field, cur[field], ts_text, mid)
        end
      end
    end
    if new_ids or merged > 0 or created == 1 then
      local n_json = '{}'
      if next(counts_of[pid]) ~= nil then n_json = cjson.encode(counts_of[pid]) end
      w[#w + 1] = 'm:n'; w[#w + 1] = n_json
      w[#w + 1] = 'm:merges'; w[#w + 1] = fmt(merges_of[pid])
    end

    lww(cur, items, w, true, S)
    if ofield then order_writes(w, ofield, cur[ofield], ts_text, ev.o) end
    if rfield then order_writes(w, rfield, cur[rfield], ts_text, {ev.rv}) end
    if afield then activity_writes(w, afield, cur[afield], ev.slot) end
    if gfield then
      local g = tonumber(cur[gfield])
      redis.call('ZADD', G .. 'au:' .. ev.g[1], 0, pid)   -- every time: a log replay fills it for older data
      if not g or ts < g then w[#w + 1] = gfield; w[#w + 1] = ts_text end
      local acct = {}
      for _, tr in ipairs(ev.g[2]) do acct[#acct + 1] = {tr[1], tr[2], ts, '', rc, st} end
      local akey = G .. 'acct:' .. ev.g[1]
      local aw, af = {}, {}
      trait_fields(acct, af, false)
      local acur = read(akey, af)
      lww(acur, acct, aw, false, akey)
      if #aw > 0 then
        sliced('HSET', akey, aw)
        -- a trait's value changed: every member's contribution carries the account's traits, so the refresh
        -- recomputes them all (it reads the members; P..'dirty:accounts' keeps the account until then)
        for i = 1, #aw, 2 do
          if not rebuilding and string.sub(aw[i], 1, 2) == 't:' and acur[aw[i]] ~= aw[i + 1] then
            redis.call('SADD', P .. 'dirty:accounts', ev.g[1])
            break
          end
        end
      end
    end
    seen_writes(w, S, cur['m:fs'], cur['m:ls'], ts_text, mid)
    local index, retrim = index_plan(w, ts_text, logged_as, cur['m:ix'])
    sliced('HSET', S, w)

    -- 6. log (trimmed once per call), the profile's event index, dirty mark (one SADD per call) ---------------
    log_event(pid, raw, logged_as, string.sub(ev.t, 1, 1), ts_text, index, retrim)
    return 'ok\t' .. pid .. '\t' .. created .. '\t' .. merged
  end

  general = {apply_ev = apply_ev, decode_json = decode_json, plain_ev = plain_ev, hmget = hmget, sliced = sliced}
  return general
end

-- The fast path: a plain event (see the header) of a known person, every identifier already on one profile: one
-- HMGET and one HSET of the profile, read by position, times compared as text, nothing decoded into tables (its
-- traits, if any, go through the traits' last-write-wins and its order or refund mark through ``order_writes``
-- (``wins_path``), on that same read and write). Any other plain event (a new identifier, several profiles, a
-- tombstone, a deletion) goes on as ``ev`` through the general path, which runs from the start: the fast path has
-- only read until then.
local PLAIN = '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$'
local TRAITED = '^\30([^\30]*)\30(.*)$'   -- the plain form with traits: its traits section, then the plain form
local ORDERED = '^\29([^\29]*)\29(.*)$'   -- with an order or a reversal: its section, then the rest
-- tsec: the traits section, or false; osec: the order section ('o \31 key \31 revenue \31 categories' or 'r \31 key'),
-- or false
local function apply_plain(s, raw, logged_as, tsec, osec)
  local t, ts_text, mid, uid, afield, slot, rest = string.match(s, PLAIN)
  local idtexts
  if rest == '' then
    idtexts = {}
  elseif not string.find(rest, '\t', 1, true) then
    idtexts = {rest}
  else
    idtexts = {}
    for tv in string.gmatch(rest, '[^\t]+') do idtexts[#idtexts + 1] = tv end
  end
  local pid = false
  if t ~= 'delete' then
    for i = 1, #idtexts do
      local o = redis.call('GET', G .. 'i:' .. idtexts[i])
      if not o or o == TOMBSTONE or (pid and o ~= pid) then pid = false; break end
      pid = o
    end
  end
  if pid and maybe_deleted(ts_text) then
    if uid ~= '' then
      local deleted_at = tonumber(redis.call('HGET', DELETED, uid))
      if deleted_at and tonumber(ts_text) <= deleted_at then return SUPPRESSED end
    end
    -- an identifier of an erased profile, or a userId other than the event's own (context.externalIds): the
    -- general path drops it if the event is at or before its erasure or deletion
    local e = redis.call('HMGET', ERASED, unpack(idtexts))
    for i = 1, #idtexts do
      if e[i] or (string.sub(idtexts[i], 1, 8) == 'user_id:' and string.sub(idtexts[i], 9) ~= uid) then
        pid = false; break
      end
    end
  end
  local order = false
  if osec then
    if string.byte(osec, 1) == 111 then   -- 'o': an order
      order = {string.match(osec, '^o\31([^\31]*)\31([^\31]*)\31(.*)$')}
    else   -- 'r': a refund or cancellation
      order = {string.sub(osec, 3)}
    end
  end
  if not pid then
    local g = general_path()
    return g.apply_ev(g.plain_ev(t, ts_text, mid, uid, afield, slot, idtexts, tsec, order), raw, logged_as)
  end

  local S = G .. 'p:' .. pid
  local n = #idtexts
  -- first and last seen are read without their messageIds, which only a tie at the same millisecond needs
  local fields = {'m:fs', 'm:ls', 'm:ix'}
  for i = 1, n do fields[3 + i] = 'x:' .. idtexts[i] end
  if afield ~= '' then fields[4 + n] = afield end
  -- an order's version ('o:'key), or a refund's mark ('q:'key)
  local opos = false
  if order then
    opos = #fields + 1
    fields[opos] = (order[2] and 'o:' or 'q:') .. order[1]
  end
  -- traits (identify, Engage's audiences and computed traits): last write wins, on the same read and write
  local tp, items, base = nil, nil, #fields
  if tsec or opos then tp = wins_path() end
  if tsec then
    items = tp.plain_traits(tsec, tonumber(ts_text))
    tp.trait_fields(items, fields, true)
  end
  local cur = #fields <= SLICE and redis.call('HMGET', S, unpack(fields)) or general_path().hmget(S, fields)
  local w = {'m:ua', now}
  for i = 1, n do
    if cur[3 + i] then sighting_writes(w, fields[3 + i], cur[3 + i], ts_text, mid) end
  end
  if afield ~= '' then activity_writes(w, afield, cur[4 + n], tonumber(slot)) end
  if opos then tp.order_writes(w, fields[opos], cur[opos], ts_text, order) end
  if items then
    local tcur = {}
    for k = base + 1, #fields do if cur[k] then tcur[fields[k]] = cur[k] end end
    tp.lww(tcur, items, w, true, S)
  end
  seen_writes(w, S, cur[1], cur[2], ts_text, mid)
  local index, retrim = index_plan(w, ts_text, logged_as, cur[3])
  if #w <= SLICE then redis.call('HSET', S, unpack(w)) else general_path().sliced('HSET', S, w) end
  log_event(pid, raw, logged_as, string.sub(t, 1, 1), ts_text, index, retrim)
  return 'ok\t' .. pid .. '\t0\t0'
end

-- One event: its dedupe shard and field, the event (see the header), the raw event to log, and (in 'reapply')
-- the log entry it is. Returns its outcome line: 'status \t profile id \t created \t merged'. It sets
-- ``seen_key`` (and ``seen_legacy``) to the dedupe record it wrote, which the caller takes back should the event
-- fail.
local seen_key, seen_legacy, legacy_f = false, false, false
-- the 8-byte field an older version stores for the id ``m`` (a signed 64-bit integer, as text): its two's
-- complement, big-endian, worked out in 32-bit halves so that no number goes past 2^53
local function legacy_field(m)
  local neg = string.byte(m, 1) == 45
  local d = neg and string.sub(m, 2) or m
  local n = #d
  local hi = n > 9 and tonumber(string.sub(d, 1, n - 9)) or 0   -- |m| = hi * 10^9 + lo
  local lo = tonumber(string.sub(d, math.max(1, n - 8)))
  local a, b = math.floor(hi / 131072), hi % 131072              -- hi = a * 2^17 + b
  local x, y = a * 1e9, b * 1e9 + lo                              -- |m| = x * 2^17 + y
  local low = (x % 32768) * 131072 + y % 4294967296
  local high = math.floor(x / 32768) + math.floor(y / 4294967296) + math.floor(low / 4294967296)
  low = low % 4294967296
  if neg then   -- 2^64 - |m|
    if low == 0 then high = (4294967296 - high) % 4294967296 else low, high = 4294967296 - low, 4294967295 - high end
  end
  return string.char(math.floor(high / 16777216), math.floor(high / 65536) % 256, math.floor(high / 256) % 256,
    high % 256, math.floor(low / 16777216), math.floor(low / 65536) % 256, math.floor(low / 256) % 256, low % 256)
end
local function apply_one(shard, dfield, payload, raw, logged_as)
  -- 1. dedupe: the older buckets, then the current one, recorded at once (taken back if the event fails) ------
  if not reapply then
    legacy_f = (older_legacy[1] or current_legacy) and legacy_field(dfield)
    for b = 1, #older_dd do
      if redis.call('SISMEMBER', older_dd[b] .. shard, dfield) == 1 then return DUPLICATE end
      if older_legacy[b] and redis.call('HEXISTS', older_legacy[b] .. shard, legacy_f) == 1 then return DUPLICATE end
    end
    if current_legacy then   -- the upgrade's first buckets: recorded as an older process would too
      local lk = current_legacy .. shard
      if redis.call('HSETNX', lk, legacy_f, '1') == 0 then return DUPLICATE end
      seen_legacy = lk
      if redis.call('HLEN', lk) == 1 then redis.call('EXPIREAT', lk, dd_expiry) end
    end
    local k = current_dd .. shard
    if redis.call('SADD', k, dfield) == 0 then return DUPLICATE end
    seen_key = k
    if redis.call('SCARD', k) == 1 then redis.call('EXPIREAT', k, dd_expiry) end
  end
  local first = string.byte(payload, 1)
  if first == 123 then   -- '{'
    local g = general_path()
    return g.apply_ev(g.decode_json(payload), raw, logged_as)
  end
  local osec = false
  if first == 29 then   -- the plain form with an order or a reversal
    osec, payload = string.match(payload, ORDERED)
    first = string.byte(payload, 1)
  end
  if first == 30 then   -- the plain form with traits
    local tsec, plain = string.match(payload, TRAITED)
    return apply_plain(plain, raw, logged_as, tsec, osec)
  end
  return apply_plain(payload, raw, logged_as, false, osec)
end

-- Redis refusing writes refuses the whole call (the caller answers 503 and the sender retries): out of memory, a
-- primary demoted to a replica under its clients (a failover), min-replicas-to-write not met, and a Cluster slot
-- being migrated (a key the event needs is missing here while the slot is MIGRATING or IMPORTING: Redis refuses
-- it as "non local", and the event applies once the move is over)
local function refused(msg)
  return string.find(msg, 'OOM command not allowed', 1, true) or string.find(msg, "READONLY You can't write", 1, true)
      or string.find(msg, 'NOREPLICAS Not enough good replicas', 1, true)
      or string.find(msg, 'non local key in a cluster node', 1, true)
end

local function finish()   -- the dirty marks, once per call
  if #dirty > SLICE then general_path().sliced('SADD', P .. 'dirty', dirty)
  elseif #dirty > 0 then redis.call('SADD', P .. 'dirty', unpack(dirty)) end
end

-- The outcomes, one line per event, as one string: a reply Redis converts at once (a table per event cost it more
-- than applying a page view's profile write).
local out = {}
local stride = reapply and 5 or 4   -- live calls carry no log entry
for i = 3, #ARGV, stride do
  seen_key, seen_legacy = false, false
  local logged_as = nil
  if reapply then logged_as = ARGV[i + 4] end
  local ok, res = pcall(apply_one, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], logged_as)
  if not ok then
    local msg = type(res) == 'table' and tostring(res.err) or tostring(res)   -- Redis 7 raises {err = ...}
    -- not applied as a whole: forget it was seen, so that its retry or replay (a dead letter) applies it
    if seen_key then pcall(redis.call, 'SREM', seen_key, ARGV[i + 1]) end
    if seen_legacy then pcall(redis.call, 'HDEL', seen_legacy, legacy_f) end
    if refused(msg) then
      pcall(finish)
      error(res)
    end
    res = 'error\t' .. string.gsub(msg, '\n', ' ')
  end
  out[#out + 1] = res
end
finish()
return table.concat(out, '\n')

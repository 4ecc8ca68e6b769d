-- Route a batch of sends: resolve each one's compiled selector to its owning instances,
-- then publish ONE envelope per instance channel carrying every message of the batch
-- for that instance (envelope.py's wire format), so that concurrent sends share a
-- round trip, a script call and a publish. Called through batch.GroupCommit.
-- KEYS[1]  hash: user -> connection ids
-- KEYS[2]  hash: instance id -> record (the cluster's instances)
-- KEYS[3..] index sets named by the calls' programs
-- ARGV[1]  channel base: channels are <base>:ch:<instance> and <base>:bcast (keys.py)
-- ARGV[2]  origin (an instance id: JSON-safe as it is)
-- ARGV[3]  more header fields, as they go after the origin: ',"sh":<n>' with several
--          shards (keys.py), for the receivers to resolve selectors among that shard's
--          connections only; else empty
-- ARGV[4..] the calls, each: its offset into KEYS, its argument count n, then n
--          arguments: message id (hex), kind, payload, fragment, program (read by
--          _common.lua's fold; a lone B is a broadcast to every instance). The fragment opens the
--          message's entry as it is: empty, or "sel":[..], naming the selector, or with
--          a secret its signature ("ts":..,"sel":..,"sig":"..",), computed (signing.py)
--          before this script ran so that the key never reaches Redis. A message sent
--          by its selector, not by ids, must have a fragment: its receivers resolve it.
-- Returns, flat, for each call: the count of its items, then the items: connections
-- routed (NO_INSTANCES: no instance ever announced itself under the prefix), how many
-- instances were reached, their ids, then the ids of the owners nobody heard (dead or
-- cut off); for a broadcast: routed, BROADCAST_REACHED, how many instances heard it. A
-- call whose program failed is REPLY_ERROR and the error's message instead (contract.py).
-- Connection ids are "<instance>:<token>" of [A-Za-z0-9_.:-], so the owner needs no
-- lookup and an id is quoted as it is. The keys built here (_common.lua, as in keys.py)
-- share the registry's hash tag, hence its slot.
local base, origin, extra = ARGV[1], ARGV[2], ARGV[3]
local bundles, channels = {}, {}
local CHANNEL, BROADCAST = base .. ':' .. W_CHANNEL .. ':', base .. ':' .. W_BROADCAST
local BYTE_USER, BYTE_SET = string.byte(OP_USER), string.byte(OP_SET)

-- Recovery (recovery.py): while the shard's history meta exists (a recovery session
-- opened), every message that is not a control is also appended to the shard's stream
-- under "<ms>-<seq>", seq gap-free, with its selector program, so that a session can
-- replay what was addressed to it; its envelope entry carries that position ("pos").
-- One HMGET per call when recovery is off.
local HISTORY, HISTORY_META = ROOT .. ':' .. W_HISTORY, ROOT .. ':' .. W_HISTORY_META
local meta = redis.call('HMGET', HISTORY_META, 'e', 's', 'm', 'n', 't')
local recording, seq, first_seq, now_ms, last_ms, position = meta[1] ~= false, 0, 0, 0, 0, ''
if recording then
  seq = tonumber(meta[2]) or 0
  first_seq = seq
  last_ms = tonumber(meta[3]) or 0
  local now = redis.call('TIME')
  now_ms = math.max(tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000), last_ms)
end
local CONTROL = {join = true, leave = true, disconnect = true}

-- The program in ARGV[first..last] as JSON, each set op naming its key without ROOT.
local function program_text(first, last, koff)
  local ops, i = {}, first
  while i <= last do
    local op = ARGV[i]
    local code = string.sub(op, 1, 1)
    if code == OP_SET then
      local key = KEYS[koff + (tonumber(string.sub(op, 2)) or 0)] or ''
      op = OP_SET .. string.sub(key, #ROOT + 2)
    end
    ops[#ops + 1] = op
    if code == OP_IDS then
      for j = i + 1, math.min(i + (tonumber(string.sub(op, 2)) or 0), last) do
        ops[#ops + 1] = ARGV[j]
      end
      i = i + (tonumber(string.sub(op, 2)) or 0)
    end
    i = i + 1
  end
  return cjson.encode(ops)
end

-- Append one message to the history; sets position, the entry's "pos" field. A mark
-- (recovery.py) is not recorded: its position is where the history ends, which tells
-- each recovery connection that everything before it has reached it.
local function record(first, last, koff, id, kind, payload)
  position = ''
  if not recording or CONTROL[kind] then return end
  if kind == 'mark' then
    position = '"pos":"' .. last_ms .. '-' .. seq .. '",'
    return
  end
  local at = now_ms .. '-' .. (seq + 1)
  local added = redis.pcall('XADD', HISTORY, 'MAXLEN', '~', tonumber(meta[4]) or 10000, at,
    'i', id, 'k', kind, 'o', program_text(first, last, koff), 'p', payload)
  if type(added) == 'table' and added.err then
    -- Not recorded (maxmemory, say), though sent live: a history without it must not
    -- pass for whole, so it ends here; the next session claim starts another epoch.
    redis.call('DEL', HISTORY_META)
    recording, seq, first_seq = false, 0, 0
    return
  end
  seq, last_ms = seq + 1, now_ms
  position = '"pos":"' .. at .. '",'
end

-- A message's entry in the envelope's header; targets nil: its receiver resolves the
-- selector that the fragment names.
local function entry(id, kind, targets, payload, fragment)
  local listed = targets and '"targets":' .. targets .. ',' or ''
  return '{' .. fragment .. position .. '"id":"' .. id .. '","kind":"' .. kind .. '",' ..
    listed .. '"size":' .. #payload .. '}'
end

-- File one message (its entry and payload) in a channel's envelope.
local function file(channel, text, payload)
  local bundle = bundles[channel]
  if not bundle then
    bundle = {entries = {}, payloads = {}}
    bundles[channel] = bundle
    channels[#channels + 1] = channel
  end
  bundle.entries[#bundle.entries + 1] = text
  bundle.payloads[#bundle.payloads + 1] = payload
end

local function add(channel, id, kind, targets, payload, fragment)
  file(channel, entry(id, kind, targets, payload, fragment), payload)
end

-- A program evaluates to a value that is either exact, {ids = {id -> true}}: a user's,
-- a connection's or a list's ids, and what & and | make of those; or by holders,
-- {n = {instance -> members}}: an index set's holders (S) or every instance (A), and
-- what & and | make of those, per instance the smaller count (&) or the sum (|), an
-- upper bound. An & with an exact side is exact: its ids that the other side has. No
-- step reads an index set's members: a send costs O(instances), plus a user's ids.
local function exact(ids)
  return {ids = ids, has = function(id) return ids[id] == true end}
end

-- {instance -> members} of an HGETALL of a holders hash.
local function counted(flat)
  local n = {}
  for k = 1, #flat, 2 do n[flat[k]] = tonumber(flat[k + 1]) end
  return n
end

local function by_holders(key)
  return {
    n = counted(redis.call('HGETALL', holders_of(key))),
    has = function(id) return redis.call('SISMEMBER', key, id) == 1 end,
  }
end

local function everyone()
  local n = {}
  for _, instance in ipairs(redis.call('HKEYS', KEYS[2])) do
    local count = redis.call('HLEN', ROOT .. ':' .. W_RECORDS .. ':' .. instance)
    if count > 0 then n[instance] = count end
  end
  return {n = n, has = exists}
end

local function counts(value)
  if not value.ids then return value.n end
  local n = {}
  for id in pairs(value.ids) do
    local instance = instance_of(id)
    n[instance] = (n[instance] or 0) + 1
  end
  return n
end

local function both(left, right)
  if left.ids or right.ids then
    local side, other, ids = left.ids and left or right, left.ids and right or left, {}
    for id in pairs(side.ids) do
      if other.has(id) then ids[id] = true end
    end
    return exact(ids)
  end
  local n = {}
  for instance, count in pairs(left.n) do
    local more = right.n[instance]
    if more then n[instance] = math.min(count, more) end
  end
  return {n = n, has = function(id) return left.has(id) and right.has(id) end}
end

local function either(left, right)
  if left.ids and right.ids then
    local ids = {}
    for id in pairs(left.ids) do ids[id] = true end
    for id in pairs(right.ids) do ids[id] = true end
    return exact(ids)
  end
  local n = {}
  for instance, count in pairs(counts(left)) do n[instance] = count end
  for instance, count in pairs(counts(right)) do n[instance] = (n[instance] or 0) + count end
  return {n = n, has = function(id) return left.has(id) or right.has(id) end}
end

-- The ids of list that exist.
local function existing(list)
  local ids = {}
  for _, id in ipairs(list) do
    if exists(id) then ids[id] = true end
  end
  return exact(ids)
end

-- What each op of a program means to a send (see fold).
local resolve = {
  set = by_holders,
  user = function(user) return exact(as_set(user_ids(user))) end,
  all = everyone,
  connection = function(id) return existing({id}) end,
  ids = existing,
  both = both,
  either = either,
}

-- File one message, named by its selector, for each instance of {instance -> members}
-- that holds any; returns those counts and instances.
local function by_selector(n, id, kind, payload, fragment)
  if fragment == '' then error('a send by selector needs its selector (the fragment)') end
  local text, groups, order = entry(id, kind, nil, payload, fragment), {}, {}
  for instance, count in pairs(n) do
    if count > 0 then
      groups[instance] = count
      order[#order + 1] = instance
      file(CHANNEL .. instance, text, payload)
    end
  end
  return groups, order
end

-- {instance -> connections} and the instances in order, for the program in
-- ARGV[first..last], having filed the message for each instance.
local function owners(first, last, koff, id, kind, payload, fragment)
  local value, groups, order = fold(first, last, koff, resolve), {}, {}
  if not value.ids then return by_selector(value.n, id, kind, payload, fragment) end
  for member in pairs(value.ids) do group_by_instance(groups, order, member) end
  for _, instance in ipairs(order) do
    local ids = groups[instance]
    local targets = #ids == 1 and '["' .. ids[1] .. '"]' or cjson.encode(ids)
    add(CHANNEL .. instance, id, kind, targets, payload, fragment)
    groups[instance] = #ids
  end
  return groups, order
end

-- Resolve every call and file its message in the bundles. What a call resolved to is
-- kept for its reply: the instance of a lone connection (the hot path: a user with one
-- connection, no tables), or {groups = counts, order}, {broadcast = live}, {err =
-- message}, or false when no instance ever announced itself.
local anyone = redis.call('EXISTS', KEYS[2]) == 1
local calls, live = {}, nil
local i = 4
while i <= #ARGV do
  local koff, n = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local first, last = i + 2, i + 1 + n
  local id, kind, payload, fragment = ARGV[first], ARGV[first + 1], ARGV[first + 2],
    ARGV[first + 3]
  local op, call = ARGV[last], nil
  record(first + 4, last, koff, id, kind, payload)
  if not anyone then
    call = false
  elseif last == first + 4 and string.byte(op) == BYTE_USER then  -- one user
    local ids = redis.call('HGET', KEYS[1], string.sub(op, 2))
    if ids and ids ~= SPILLED and not string.find(ids, ' ', 1, true) then
      call = instance_of(ids)
      add(CHANNEL .. call, id, kind, '["' .. ids .. '"]', payload, fragment)
    end
  elseif last == first + 4 and string.byte(op) == BYTE_SET and fragment ~= '' and
      KEYS[koff + (tonumber(string.sub(op, 2)) or 0)] then  -- one set (a bad op: fold)
    local flat = redis.pcall('HGETALL', holders_of(KEYS[koff + tonumber(string.sub(op, 2))]))
    if flat.err then
      call = {err = flat.err}
    else
      local groups, order = by_selector(counted(flat), id, kind, payload, fragment)
      call = {groups = groups, order = order}
    end
  elseif last == first + 4 and op == OP_BROADCAST and fragment ~= '' then
    live = live or live_count()
    call = {broadcast = live}
    if live > 0 then add(BROADCAST, id, kind, nil, payload, fragment) end
  end
  if call == nil then
    local ok, groups, order = pcall(owners, first + 4, last, koff, id, kind, payload, fragment)
    if ok then
      call = {groups = groups, order = order}
    else  -- redis.call raises a table {err = ...} (Redis 7) or a string
      call = {err = type(groups) == 'table' and groups.err or tostring(groups)}
    end
  end
  calls[#calls + 1] = call
  i = last + 1
end

if recording and seq > first_seq then  -- retention by time; by length, each MAXLEN
  redis.call('HSET', HISTORY_META, 's', seq, 'm', now_ms)
  redis.call('XTRIM', HISTORY, 'MINID', '~', now_ms - (tonumber(meta[5]) or 120000))
  -- The stream goes with its meta, whose TTL only sessions extend (recovery.py): when
  -- the last session is gone, so is the history, and sends stop recording.
  local left = redis.call('PTTL', HISTORY_META)
  if left > 0 then redis.call('PEXPIRE', HISTORY, left) end
end

-- One publish per channel; a channel nobody hears belongs to a dead or cut-off instance.
local heard = {}
for _, channel in ipairs(channels) do
  local bundle = bundles[channel]
  heard[channel] = redis.call(PUBLISH, channel,
    '{"v":' .. VERSION .. ',"origin":"' .. origin .. '"' .. extra .. ',"messages":[' ..
    table.concat(bundle.entries, ',') .. ']}\n' .. table.concat(bundle.payloads))
end

-- One flat reply, because Redis converts a Lua table to a reply slowly (it looks for
-- several special fields in each): each call's item count, then its items.
local out = {}
local function put(items)
  out[#out + 1] = #items
  for k = 1, #items do out[#out + 1] = items[k] end
end
for _, call in ipairs(calls) do
  if type(call) == 'string' then  -- the hot path, without a table
    local reached, n = heard[CHANNEL .. call] > 0 and 1 or 0, #out
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 3, reached, reached, call
  elseif call == false then
    put({NO_INSTANCES, 0})
  elseif call.err then
    out[#out + 1] = REPLY_ERROR
    out[#out + 1] = call.err
  elseif call.broadcast then
    local count = heard[BROADCAST] or 0
    put({count > 0 and call.broadcast or 0, BROADCAST_REACHED, count})
  else
    local routed, reached, unheard = 0, {}, {}
    for _, instance in ipairs(call.order) do
      if heard[CHANNEL .. instance] > 0 then
        routed = routed + call.groups[instance]
        reached[#reached + 1] = instance
      else
        unheard[#unheard + 1] = instance
      end
    end
    local items = {routed, #reached}
    for _, instance in ipairs(reached) do items[#items + 1] = instance end
    for _, instance in ipairs(unheard) do items[#items + 1] = instance end
    put(items)
  end
end
return out

-- Route a batch of sends: resolve each one's compiled selector to its owning instances,
-- then publish ONE envelope per instance channel carrying every message of the batch
-- for that instance (envelope.py's wire format), so that concurrent sends share a
-- round trip, a script call and a publish. Called through batch.GroupCommit.
-- KEYS[1]  hash: user -> connection ids
-- KEYS[2]  hash: instance id -> record (the cluster's instances)
-- KEYS[3..] index sets named by the calls' programs
-- ARGV[1]  channel base: channels are <base>:ch:<instance> and <base>:bcast (keys.py)
-- ARGV[2]  origin (an instance id: JSON-safe as it is)
-- ARGV[3..] the calls, each: its offset into KEYS, its argument count n, then n
--          arguments: message id (hex), kind, payload, signature, program (see
--          run_program; a lone B is a broadcast to every instance). The signature is
--          empty, or a JSON fragment ("ts":..,"sel":..,"sig":"..",) that opens the
--          message's entry as it is: it was computed (signing.py) before this script
--          ran, so that the key never reaches Redis.
-- Returns, flat, for each call: the count of its items, then the items: connections
-- routed (-1: no instance ever announced itself under the prefix), how many instances
-- were reached, their ids, then the ids of the owners nobody heard (dead or cut off);
-- for a broadcast: routed, -1, how many instances heard it. A call whose program failed
-- is -1 and the error's message instead (batch.py's convention).
-- Connection ids are "<instance>:<token>" of [A-Za-z0-9_.:-], so the owner needs no
-- lookup and an id is quoted as it is. The keys built here (_common.lua, as in keys.py)
-- share the registry's hash tag, hence its slot.
local base, origin = ARGV[1], ARGV[2]
local bundles, channels = {}, {}

local function add(channel, id, kind, targets, payload, signature)
  local bundle = bundles[channel]
  if not bundle then
    bundle = {entries = {}, payloads = {}}
    bundles[channel] = bundle
    channels[#channels + 1] = channel
  end
  bundle.entries[#bundle.entries + 1] = '{' .. signature .. '"id":"' .. id ..
    '","kind":"' .. kind .. '","targets":' .. targets .. ',"size":' .. #payload .. '}'
  bundle.payloads[#bundle.payloads + 1] = payload
end

-- {instance -> ids} and the instances in order, for the program in ARGV[first..last].
local function owners(first, last, koff)
  local groups, order = {}, {}
  for id in pairs(run_program(first, last, koff)) do
    local instance = string.match(id, '^[^:]+')
    local group = groups[instance]
    if not group then
      group = {}
      groups[instance] = group
      order[#order + 1] = instance
    end
    group[#group + 1] = id
  end
  return groups, order
end

-- Resolve every call and file its message in the bundles. What a call resolved to is
-- kept for its reply: the instance of a lone connection (the hot path: a user with one
-- connection, no tables), or {groups, order}, {broadcast = live}, {err = message}, or
-- false when no instance ever announced itself.
local anyone = redis.call('EXISTS', KEYS[2]) == 1
local calls, live = {}, nil
local i = 3
while i <= #ARGV do
  local koff, n = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local first, last = i + 2, i + 1 + n
  local id, kind, payload, signature = ARGV[first], ARGV[first + 1], ARGV[first + 2],
    ARGV[first + 3]
  local op, call = ARGV[last], nil
  if not anyone then
    call = false
  elseif last == first + 4 and string.byte(op) == 85 then  -- 'U': one user
    local ids = redis.call('HGET', KEYS[1], string.sub(op, 2))
    if ids and ids ~= '*' and not string.find(ids, ' ', 1, true) then
      call = string.match(ids, '^[^:]+')
      add(base .. ':ch:' .. call, id, kind, '["' .. ids .. '"]', payload, signature)
    end
  elseif last == first + 4 and op == 'B' then
    live = live or live_count()
    call = {broadcast = live}
    if live > 0 then add(base .. ':bcast', id, kind, '[]', payload, signature) end
  end
  if call == nil then
    local ok, groups, order = pcall(owners, first + 4, last, koff)
    if ok then
      call = {groups = groups, order = order}
      for _, instance in ipairs(order) do
        local ids = groups[instance]
        local targets = #ids == 1 and '["' .. ids[1] .. '"]' or cjson.encode(ids)
        add(base .. ':ch:' .. instance, id, kind, targets, payload, signature)
      end
    else  -- redis.call raises a table {err = ...} (Redis 7) or a string
      call = {err = type(groups) == 'table' and groups.err or tostring(groups)}
    end
  end
  calls[#calls + 1] = call
  i = last + 1
end

-- One publish per channel; a channel nobody hears belongs to a dead or cut-off instance.
local heard = {}
for _, channel in ipairs(channels) do
  local bundle = bundles[channel]
  heard[channel] = redis.call('PUBLISH', channel,
    '{"v":2,"origin":"' .. origin .. '","messages":[' .. table.concat(bundle.entries, ',') ..
    ']}\n' .. table.concat(bundle.payloads))
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
    local reached, n = heard[base .. ':ch:' .. call] > 0 and 1 or 0, #out
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 3, reached, reached, call
  elseif call == false then
    put({-1, 0})
  elseif call.err then
    out[#out + 1] = -1
    out[#out + 1] = call.err
  elseif call.broadcast then
    local count = heard[base .. ':bcast'] or 0
    put({count > 0 and call.broadcast or 0, -1, count})
  else
    local routed, reached, unheard = 0, {}, {}
    for _, instance in ipairs(call.order) do
      if heard[base .. ':ch:' .. instance] > 0 then
        routed = routed + #call.groups[instance]
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

-- Resolve a compiled selector to its owning instances and publish one envelope per
-- owning instance: the whole send is one round trip. In "count" mode, only count.
-- KEYS[1]  hash: user -> connection ids
-- KEYS[2]  hash: instance id -> record (the cluster's instances)
-- KEYS[3..] index sets named by the program
-- ARGV[1]  "publish", or "count" (returns a number, publishes nothing)
-- ARGV[2]  channel base: channels are <base>:ch:<instance> and <base>:bcast (keys.py)
-- ARGV[3]  envelope head, up to and including '"targets":'
-- ARGV[4]  payload
-- ARGV[5..] program, postfix: S<n> members of KEYS[n]; U<user> the user's connections;
--          A every id; C<id> one id if it exists; M<n> followed by n ids, those of them
--          that exist; & and | combine the top two sets; a lone B is a broadcast.
-- Publish mode returns {connections routed, the instances reached (their ids; for a
-- broadcast, how many heard it), the owners nobody heard}; -1 routed: no instance ever.
-- Connection ids are "<instance>:<token>", so the owner needs no lookup. The keys built
-- here (_common.lua, as in keys.py) share the registry's hash tag, hence its slot.
local publish = ARGV[1] == 'publish'
local FIRST_OP = 5
local lone = #ARGV == FIRST_OP and ARGV[FIRST_OP]

-- The hot path: a send to one user who has one connection. Two calls (HGET, PUBLISH)
-- and no tables; a user found means instances have announced themselves.
if publish and lone and string.byte(lone) == 85 then  -- 'U'
  local ids = redis.call('HGET', KEYS[1], string.sub(lone, 2))
  if ids and ids ~= '*' and not string.find(ids, ' ', 1, true) then
    local instance = string.match(ids, '^[^:]+')
    -- Ids are [A-Za-z0-9_.:-]: quoted as they are, they are the JSON cjson would write.
    local envelope = ARGV[3] .. '["' .. ids .. '"]}\n' .. ARGV[4]
    if redis.call('PUBLISH', ARGV[2] .. ':ch:' .. instance, envelope) > 0 then
      return {1, {instance}, {}}
    end
    return {0, {}, {instance}}
  end
end

-- No instance has ever announced itself under this prefix: a wrong prefix, or a
-- cluster that is down. Say so (-1) rather than "routed to nobody" or "none".
if redis.call('EXISTS', KEYS[2]) == 0 then
  if publish then return {-1, 0, {}} end
  return -1
end

-- Counting everyone needs no member list.
if ARGV[1] == 'count' and (lone == 'A' or lone == 'B') then
  local count = 0
  for _, instance in ipairs(redis.call('HKEYS', KEYS[2])) do
    count = count + redis.call('HLEN', ROOT .. ':c:' .. instance)
  end
  return count
end

if publish and lone == 'B' then
  -- One publish for every instance; count only the connections of live instances.
  local count = 0
  for _, instance in ipairs(redis.call('HKEYS', KEYS[2])) do
    if redis.call('EXISTS', ROOT .. ':hb:' .. instance) == 1 then
      count = count + redis.call('HLEN', ROOT .. ':c:' .. instance)
    end
  end
  if count == 0 then return {0, 0, {}} end
  local heard = redis.call('PUBLISH', ARGV[2] .. ':bcast', ARGV[3] .. '[]}\n' .. ARGV[4])
  if heard == 0 then return {0, 0, {}} end
  return {count, heard, {}}
end

local function as_set(ids)
  local set = {}
  for _, id in ipairs(ids) do set[id] = true end
  return set
end

local function exists(id)
  local key, token = record_at(id)
  return key ~= nil and redis.call('HEXISTS', key, token) == 1
end

local stack = {}
local i = FIRST_OP
while i <= #ARGV do
  local op = ARGV[i]
  local code = string.sub(op, 1, 1)
  if code == 'S' then
    stack[#stack + 1] = as_set(redis.call('SMEMBERS', KEYS[tonumber(string.sub(op, 2))]))
  elseif code == 'U' then
    stack[#stack + 1] = as_set(user_ids(string.sub(op, 2)))
  elseif code == 'A' or code == 'B' then
    stack[#stack + 1] = as_set(every_id())
  elseif code == 'C' then
    local id, set = string.sub(op, 2), {}
    if exists(id) then set[id] = true end
    stack[#stack + 1] = set
  elseif code == 'M' then
    -- M<n> then n ids: the connections among them that exist, as one set.
    local n, set = tonumber(string.sub(op, 2)), {}
    for j = i + 1, i + n do
      if exists(ARGV[j]) then set[ARGV[j]] = true end
    end
    stack[#stack + 1] = set
    i = i + n
  else
    local right, left, out = table.remove(stack), table.remove(stack), {}
    if code == '&' then
      for id in pairs(left) do if right[id] then out[id] = true end end
    else
      for id in pairs(left) do out[id] = true end
      for id in pairs(right) do out[id] = true end
    end
    stack[#stack + 1] = out
  end
  i = i + 1
end

if ARGV[1] == 'count' then
  local count = 0
  for _ in pairs(stack[1]) do count = count + 1 end
  return count
end

local groups, order = {}, {}
for id in pairs(stack[1]) do
  local instance = string.match(id, '^[^:]+')
  local group = groups[instance]
  if not group then
    group = {}
    groups[instance] = group
    order[#order + 1] = instance
  end
  group[#group + 1] = id
end

-- An instance channel nobody hears belongs to a dead or cut-off instance: its
-- connections are not counted as routed, and the caller is told which it was.
local routed, reached, unheard = 0, {}, {}
for _, instance in ipairs(order) do
  local ids = groups[instance]
  local envelope = ARGV[3] .. cjson.encode(ids) .. '}\n' .. ARGV[4]
  if redis.call('PUBLISH', ARGV[2] .. ':ch:' .. instance, envelope) > 0 then
    routed = routed + #ids
    reached[#reached + 1] = instance
  else
    unheard[#unheard + 1] = instance
  end
end
return {routed, reached, unheard}

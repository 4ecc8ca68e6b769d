-- Resolve a compiled selector to its owning instances and, in "publish" mode, publish
-- one envelope per owning instance: the whole send is one round trip.
-- KEYS[1]  hash: connection id -> record
-- KEYS[2]  set: every connection id
-- KEYS[3]  hash: instance id -> record (the cluster's instances)
-- KEYS[4..] index sets named by the program
-- ARGV[1]  "publish", "resolve" ({instance, ids, ...}) or "count" (a number)
-- ARGV[2]  instance channel prefix (channel = prefix .. instance id)
-- ARGV[3]  broadcast channel
-- ARGV[4]  envelope head, up to and including '"targets":'
-- ARGV[5]  payload
-- ARGV[6]  heartbeat key prefix, ARGV[7] instance set prefix (for a broadcast)
-- ARGV[8..] program, postfix: S<n> members of KEYS[n]; A every id; C<id> one id if it
--          exists; M<n> followed by n ids, those of them that exist; & and | combine
--          the top two sets; a lone B is a broadcast.
-- Connection ids are "<instance>:<token>", so the owner needs no lookup. Keys built
-- here from the prefixes share the registry's hash tag, hence its cluster slot.
local publish = ARGV[1] == 'publish'

-- Counting everyone needs no member list.
if ARGV[1] == 'count' and #ARGV == 8 and (ARGV[8] == 'A' or ARGV[8] == 'B') then
  return redis.call('SCARD', KEYS[2])
end

-- No instance has ever announced itself under this prefix: a wrong prefix, or a
-- cluster that is down. Say so (-1) rather than "routed to nobody".
if publish and redis.call('EXISTS', KEYS[3]) == 0 then
  return {-1, 0, {}}
end

if publish and ARGV[8] == 'B' and #ARGV == 8 then
  -- One publish for every instance; count only the connections of live instances.
  local count = 0
  for _, instance in ipairs(redis.call('HKEYS', KEYS[3])) do
    if redis.call('EXISTS', ARGV[6] .. instance) == 1 then
      count = count + redis.call('SCARD', ARGV[7] .. instance)
    end
  end
  if count == 0 then return {0, 0, {}} end
  local heard = redis.call('PUBLISH', ARGV[3], ARGV[4] .. '[]}\n' .. ARGV[5])
  if heard == 0 then return {0, 0, {}} end
  return {count, heard, {}}
end

local function members(key)
  local set = {}
  for _, id in ipairs(redis.call('SMEMBERS', key)) do set[id] = true end
  return set
end

local stack = {}
local i = 8
while i <= #ARGV do
  local op = ARGV[i]
  local code = string.sub(op, 1, 1)
  if code == 'S' then
    stack[#stack + 1] = members(KEYS[tonumber(string.sub(op, 2))])
  elseif code == 'A' or code == 'B' then
    stack[#stack + 1] = members(KEYS[2])
  elseif code == 'C' then
    local id, set = string.sub(op, 2), {}
    if redis.call('HEXISTS', KEYS[1], id) == 1 then set[id] = true end
    stack[#stack + 1] = set
  elseif code == 'M' then
    -- M<n> then n ids: the connections among them that exist, as one set.
    local n, set = tonumber(string.sub(op, 2)), {}
    for j = i + 1, i + n do
      if redis.call('HEXISTS', KEYS[1], ARGV[j]) == 1 then set[ARGV[j]] = true end
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

if not publish then
  local out = {}
  for _, instance in ipairs(order) do
    out[#out + 1] = instance
    out[#out + 1] = groups[instance]
  end
  return out
end

-- An instance channel nobody hears belongs to a dead or cut-off instance: its
-- connections are not counted as routed, and the caller is told which it was.
local routed, reached, unheard = 0, 0, {}
for _, instance in ipairs(order) do
  local ids = groups[instance]
  local envelope = ARGV[4] .. cjson.encode(ids) .. '}\n' .. ARGV[5]
  if redis.call('PUBLISH', ARGV[2] .. instance, envelope) > 0 then
    routed = routed + #ids
    reached = reached + 1
  else
    unheard[#unheard + 1] = instance
  end
end
return {routed, reached, unheard}

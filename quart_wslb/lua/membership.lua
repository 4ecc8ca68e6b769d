-- Add connections to a group, or remove them from it, and tell their owners.
-- The record keeps the group's name (F_GROUPS), so unregistering removes the membership too;
-- the owning instance is told so that it can restore the membership if Redis loses
-- its data.
-- KEYS[1]  hash: user -> connection ids (names the root of every key)
-- KEYS[2]  the group's set (its holders are kept too)
-- ARGV[1]  "join" or "leave", ARGV[2] group name, ARGV[3] instance channel prefix,
-- ARGV[4]  control envelope head (envelope.head, kind join/leave), ARGV[5..] connection ids
-- Returns how many of the ids exist (whether or not they were members already).
local join = ARGV[1] == 'join'
local groups, order, found = {}, {}, 0
for i = 5, #ARGV do
  local id = ARGV[i]
  local key, token = record_at(id)
  local record = key and decode_record(redis.call('HGET', key, token) or nil)
  if record then
    found = found + 1
    local names = {}
    local had = record[F_GROUPS]
    for _, name in ipairs(type(had) == 'table' and had or {}) do
      if name ~= ARGV[2] then names[#names + 1] = name end
    end
    if join then
      names[#names + 1] = ARGV[2]
      index_add(KEYS[2], id)
    else
      index_remove(KEYS[2], id)
    end
    record[F_GROUPS] = names
    redis.call('HSET', key, token, cjson.encode(record))
    group_by_instance(groups, order, id)
  end
end
for _, instance in ipairs(order) do
  redis.call(PUBLISH, ARGV[3] .. instance,
    ARGV[4] .. cjson.encode(groups[instance]) .. ',"size":' .. #ARGV[2] .. '}]}\n' .. ARGV[2])
end
return found

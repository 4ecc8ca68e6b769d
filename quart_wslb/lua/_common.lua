-- Shared by the scripts that read records (quart_wslb/_lua.py prepends it). Mirrors quart_wslb/keys.py:
-- ROOT is "{prefix}", taken from KEYS[1], which is always <ROOT>:users.
local ROOT = string.sub(KEYS[1], 1, -7)

-- A connection id is "<instance>:<token>"; its record is field <token> of <ROOT>:c:<instance>.
local function record_at(id)
  local instance, token = string.match(id, '^([^:]+):(.+)$')
  if not instance then return nil, nil end
  return ROOT .. ':c:' .. instance, token
end

local function get_record(id)
  local key, token = record_at(id)
  if not key then return nil end
  return redis.call('HGET', key, token) or nil
end

local function decode_record(raw)
  local ok, record = pcall(cjson.decode, raw or '')
  if ok and type(record) == 'table' then return record end
  return nil
end

-- The index sets a record's connection is in (its user is indexed in <ROOT>:users).
local function index_keys(record)
  local keys = {}
  if type(record.p) == 'string' then keys[#keys + 1] = ROOT .. ':p:' .. record.p end
  if type(record.m) == 'table' then
    for name, value in pairs(record.m) do
      keys[#keys + 1] = ROOT .. ':m:' .. #name .. ':' .. name .. ':' .. tostring(value)
    end
  end
  if type(record.g) == 'table' then
    for _, name in ipairs(record.g) do keys[#keys + 1] = ROOT .. ':g:' .. name end
  end
  return keys
end

-- Each index set <ROOT>:<word>:<value> has a hash of its holders, <ROOT>:i<word>:<value>
-- (keys.py's Keys.holders): instance -> how many of the set's members it owns. Every
-- script that adds to or takes from a set keeps it, so that a send learns which
-- instances hold members in O(instances), never reading the members.
local function holders_of(key)
  return ROOT .. ':i' .. string.sub(key, #ROOT + 2)
end

local function index_add(key, id)
  if redis.call('SADD', key, id) == 1 then
    redis.call('HINCRBY', holders_of(key), string.match(id, '^[^:]+'), 1)
  end
end

local function index_remove(key, id)
  if redis.call('SREM', key, id) == 1 then
    local holders, instance = holders_of(key), string.match(id, '^[^:]+')
    if redis.call('HINCRBY', holders, instance, -1) <= 0 then
      redis.call('HDEL', holders, instance)
    end
  end
end

-- <ROOT>:users maps a user to its connection ids, space-separated (ids have no spaces):
-- a user is present while its field exists. That is far smaller than a set per user,
-- but a change rewrites the list, so past SPILL ids the user's ids move to a set of
-- their own, <ROOT>:u:<user>, and the field holds the marker '*' (an id always has a
-- ':'). The set stays until the user's last connection goes.
local SPILL = 8

local function user_set(user)
  return ROOT .. ':u:' .. user
end

local function user_ids(user)
  local raw = redis.call('HGET', KEYS[1], user)
  if raw == '*' then return redis.call('SMEMBERS', user_set(user)) end
  local ids = {}
  if raw then
    for id in string.gmatch(raw, '[^ ]+') do ids[#ids + 1] = id end
  end
  return ids
end

-- Returns 1 when this made the user present (its first connection).
local function user_add(user, id)
  local raw = redis.call('HGET', KEYS[1], user)
  if not raw then
    redis.call('HSET', KEYS[1], user, id)
    return 1
  end
  if raw == '*' then
    redis.call('SADD', user_set(user), id)
    return 0
  end
  local listed = ' ' .. raw .. ' '
  if string.find(listed, ' ' .. id .. ' ', 1, true) then return 0 end
  local _, spaces = string.gsub(raw, ' ', ' ')
  if spaces + 1 < SPILL then
    redis.call('HSET', KEYS[1], user, raw .. ' ' .. id)
    return 0
  end
  local ids = {id}
  for other in string.gmatch(raw, '[^ ]+') do ids[#ids + 1] = other end
  redis.call('SADD', user_set(user), unpack(ids))
  redis.call('HSET', KEYS[1], user, '*')
  return 0
end

-- Returns 1 when this removed the user's last connection.
local function user_remove(user, id)
  local raw = redis.call('HGET', KEYS[1], user)
  if not raw then return 0 end
  if raw == '*' then
    redis.call('SREM', user_set(user), id)
    if redis.call('SCARD', user_set(user)) > 0 then return 0 end
    redis.call('HDEL', KEYS[1], user)
    return 1
  end
  local left = {}
  for other in string.gmatch(raw, '[^ ]+') do
    if other ~= id then left[#left + 1] = other end
  end
  if #left == 0 then
    redis.call('HDEL', KEYS[1], user)
    return 1
  end
  redis.call('HSET', KEYS[1], user, table.concat(left, ' '))
  return 0
end

-- A set (id -> true) of a list of ids.
local function as_set(ids)
  local set = {}
  for _, id in ipairs(ids) do set[id] = true end
  return set
end

local function exists(id)
  local key, token = record_at(id)
  return key ~= nil and redis.call('HEXISTS', key, token) == 1
end

-- Every connection of the live instances (a heartbeat): what a broadcast reaches.
local function live_count()
  local count = 0
  for _, instance in ipairs(redis.call('HKEYS', ROOT .. ':instances')) do
    if redis.call('EXISTS', ROOT .. ':hb:' .. instance) == 1 then
      count = count + redis.call('HLEN', ROOT .. ':c:' .. instance)
    end
  end
  return count
end

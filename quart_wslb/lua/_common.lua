-- Shared by the scripts that read records (quart_wslb/_lua.py prepends it, after the
-- contract's constants: W_* key words, OP_* selector ops, F_* record fields, SPILL, ...).
-- Every key is <ROOT>:<word>..., ROOT being the hash tag "{prefix}" (keys.py's Keys), so
-- every key a script touches, given or built here, is in ROOT's slot. A script learns
-- ROOT from KEYS[1], which is always <ROOT>:users, and refuses any other KEYS[1]. (The
-- other KEYS are not checked, on the hot path: Keys names them all under ROOT, and a
-- Redis Cluster refuses a call whose keys span slots.)
local ROOT = string.sub(KEYS[1] or '', 1, -#W_USERS - 2)
if KEYS[1] ~= ROOT .. ':' .. W_USERS or string.byte(ROOT, 1) ~= 123 or
    string.byte(ROOT, -1) ~= 125 then  -- '{' and '}'
  error('KEYS[1] must be {<prefix>}:' .. W_USERS .. ', not ' .. tostring(KEYS[1]))
end

-- A connection id is "<instance>:<token>".
local function instance_of(id)
  return string.match(id, '^[^:]+')
end

-- Its record is field <token> of the instance's hash of records.
local function record_at(id)
  local instance, token = string.match(id, '^([^:]+):(.+)$')
  if not instance then return nil, nil end
  return ROOT .. ':' .. W_RECORDS .. ':' .. instance, token
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
  local keys, path, metadata, groups = {}, record[F_PATH], record[F_METADATA], record[F_GROUPS]
  if type(path) == 'string' then keys[#keys + 1] = ROOT .. ':' .. W_PATH .. ':' .. path end
  if type(metadata) == 'table' then
    for name, value in pairs(metadata) do
      keys[#keys + 1] = ROOT .. ':' .. W_METADATA .. ':' .. #name .. ':' .. name .. ':' ..
        tostring(value)
    end
  end
  if type(groups) == 'table' then
    for _, name in ipairs(groups) do keys[#keys + 1] = ROOT .. ':' .. W_GROUP .. ':' .. name end
  end
  return keys
end

-- Each index set <ROOT>:<word>:<value> has a hash of its holders, <ROOT>:i<word>:<value>
-- (keys.py's Keys.holders): instance -> how many of the set's members it owns. Every
-- script that adds to or takes from a set keeps it, so that a send learns which
-- instances hold members in O(instances), never reading the members.
local function holders_of(key)
  return ROOT .. ':' .. W_HOLDERS .. string.sub(key, #ROOT + 2)
end

local function index_add(key, id)
  if redis.call('SADD', key, id) == 1 then
    redis.call('HINCRBY', holders_of(key), instance_of(id), 1)
  end
end

local function index_remove(key, id)
  if redis.call('SREM', key, id) == 1 then
    local holders, instance = holders_of(key), instance_of(id)
    if redis.call('HINCRBY', holders, instance, -1) <= 0 then
      redis.call('HDEL', holders, instance)
    end
  end
end

-- <ROOT>:users maps a user to its connection ids, space-separated (ids have no spaces):
-- a user is present while its field exists. That is far smaller than a set per user,
-- but a change rewrites the list, so past SPILL ids the user's ids move to a set of
-- their own, <ROOT>:u:<user>, and the field holds the marker SPILLED (an id always has
-- a ':'). The set stays until the user's last connection goes.
local function user_set(user)
  return ROOT .. ':' .. W_USER_SET .. ':' .. user
end

local function user_ids(user)
  local raw = redis.call('HGET', KEYS[1], user)
  if raw == SPILLED then return redis.call('SMEMBERS', user_set(user)) end
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
  if raw == SPILLED then
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
  redis.call('HSET', KEYS[1], user, SPILLED)
  return 0
end

-- Returns 1 when this removed the user's last connection.
local function user_remove(user, id)
  local raw = redis.call('HGET', KEYS[1], user)
  if not raw then return 0 end
  if raw == SPILLED then
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
  for _, instance in ipairs(redis.call('HKEYS', ROOT .. ':' .. W_INSTANCES)) do
    if redis.call('EXISTS', ROOT .. ':' .. W_HEARTBEAT .. ':' .. instance) == 1 then
      count = count + redis.call('HLEN', ROOT .. ':' .. W_RECORDS .. ':' .. instance)
    end
  end
  return count
end

-- File connection id under its instance in groups ({instance -> ids}), and a new
-- instance at the end of order: what a script publishes to each owner.
local function group_by_instance(groups, order, id)
  local instance = instance_of(id)
  local group = groups[instance]
  if not group then
    group = {}
    groups[instance] = group
    order[#order + 1] = instance
  end
  group[#group + 1] = id
end

-- The one reader of a compiled selector program (selectors.Program), the postfix ops
-- ARGV[first..last], as selectors.fold reads them in Python. The script says what each
-- op means, in a table of functions: set(key) for S<n> (KEYS[koff + n]), user(name) for
-- U<name>, all(op) for A and B, connection(id) for C<id>, ids(list) for M<n> and the n
-- ids after it, both(left, right) and either(left, right) for & and |. Any other op, a
-- bad count or key, or a program that does not leave exactly one value is an error.
local function fold(first, last, koff, on)
  local stack, top, i = {}, 0, first
  while i <= last do
    local op, value = ARGV[i], nil
    if op == OP_AND or op == OP_OR then
      if top < 2 then error('selector op ' .. op .. ' needs two values') end
      local left, right = stack[top - 1], stack[top]
      stack[top] = nil
      top = top - 1
      if op == OP_AND then value = on.both(left, right) else value = on.either(left, right) end
    else
      local code = string.sub(op, 1, 1)
      if code == OP_SET then
        local n = tonumber(string.sub(op, 2))
        local key = n and n > FIXED_KEYS and KEYS[koff + n]
        if not key then error('selector op ' .. string.sub(op, 1, 40) .. ' names no key') end
        value = on.set(key)
      elseif code == OP_USER then
        value = on.user(string.sub(op, 2))
      elseif op == OP_ALL or op == OP_BROADCAST then
        value = on.all(op)
      elseif code == OP_CONNECTION then
        value = on.connection(string.sub(op, 2))
      elseif code == OP_IDS then
        local n = tonumber(string.sub(op, 2))
        if not n or n < 0 or n % 1 ~= 0 or i + n > last then
          error('selector op ' .. string.sub(op, 1, 40) .. ' has no such count of ids')
        end
        local ids = {}
        for j = i + 1, i + n do ids[#ids + 1] = ARGV[j] end
        value = on.ids(ids)
        i = i + n
      else
        error('unknown selector op ' .. string.sub(op, 1, 40))
      end
      top = top + 1
    end
    stack[top] = value
    i = i + 1
  end
  if top ~= 1 then error('a selector program must leave one value, not ' .. top) end
  return stack[1]
end

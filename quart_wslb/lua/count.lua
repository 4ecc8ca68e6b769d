-- Count the connections of a one-operand selector, without reading members: S<n> an
-- index set (its size), U<user> a user's, C<id> one if it exists, M<n> and n ids those
-- that exist, A or B everyone. A compound selector is counted in pages instead
-- (emitter.py), never in one call.
-- KEYS[1]  hash: user -> connection ids
-- KEYS[2]  hash: instance id -> record (the cluster's instances)
-- KEYS[3]  the index set of an S op
-- ARGV     the program (read by _common.lua's fold): one operand
-- Returns the count; NO_INSTANCES if no instance ever announced itself under the prefix.
if redis.call('EXISTS', KEYS[2]) == 0 then return NO_INSTANCES end

local function compound()
  error('count.lua counts one operand')
end

local size = {
  set = function(key) return redis.call('SCARD', key) end,
  user = function(user) return #user_ids(user) end,
  all = function()
    local count = 0
    for _, instance in ipairs(redis.call('HKEYS', KEYS[2])) do
      count = count + redis.call('HLEN', ROOT .. ':' .. W_RECORDS .. ':' .. instance)
    end
    return count
  end,
  connection = function(id) return exists(id) and 1 or 0 end,
  ids = function(list)
    local count = 0
    for _, id in ipairs(list) do
      if exists(id) then count = count + 1 end
    end
    return count
  end,
  both = compound,
  either = compound,
}

return fold(1, #ARGV, 0, size)

-- Count the connections of a one-operand selector, without reading members: S<n> an
-- index set (its size), U<user> a user's, C<id> one if it exists, A or B everyone.
-- A compound selector is counted in pages instead (emitter.py), never in one call.
-- KEYS[1]  hash: user -> connection ids
-- KEYS[2]  hash: instance id -> record (the cluster's instances)
-- KEYS[3]  the index set of an S op
-- ARGV[1]  the op (see evaluate in send.lua)
-- Returns the count; -1 if no instance ever announced itself under the prefix.
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local op = ARGV[1]
local code = string.sub(op, 1, 1)
if #ARGV ~= 1 then
  error('count.lua counts one operand')
elseif code == 'S' then
  return redis.call('SCARD', KEYS[tonumber(string.sub(op, 2))])
elseif code == 'U' then
  return #user_ids(string.sub(op, 2))
elseif code == 'C' then
  return exists(string.sub(op, 2)) and 1 or 0
elseif op == 'A' or op == 'B' then
  local count = 0
  for _, instance in ipairs(redis.call('HKEYS', KEYS[2])) do
    count = count + redis.call('HLEN', ROOT .. ':c:' .. instance)
  end
  return count
end
error('unknown selector op ' .. string.sub(op, 1, 40))

-- Count the connections a compiled selector matches.
-- KEYS[1]  hash: user -> connection ids
-- KEYS[2]  hash: instance id -> record (the cluster's instances)
-- KEYS[3..] index sets named by the program
-- ARGV     the program (see run_program in _common.lua)
-- Returns the count; -1 if no instance ever announced itself under the prefix.
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end

-- Counting everyone needs no member list.
if #ARGV == 1 and (ARGV[1] == 'A' or ARGV[1] == 'B') then
  local count = 0
  for _, instance in ipairs(redis.call('HKEYS', KEYS[2])) do
    count = count + redis.call('HLEN', ROOT .. ':c:' .. instance)
  end
  return count
end

-- One index set: its size, without reading its members.
if #ARGV == 1 and string.sub(ARGV[1], 1, 1) == 'S' then
  return redis.call('SCARD', KEYS[tonumber(string.sub(ARGV[1], 2))])
end

local count = 0
for _ in pairs(run_program(1, #ARGV, 0)) do count = count + 1 end
return count

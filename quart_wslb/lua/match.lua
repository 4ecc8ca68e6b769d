-- Filter candidate connection ids through a compiled selector; return their records.
-- Used for paged queries: the caller scans a driver page by page and asks here which
-- candidates match, so no reply is ever larger than a page.
-- KEYS[1]  hash: user -> connection ids
-- KEYS[2]  hash: the instances (unused here; the layout is send.lua's)
-- KEYS[3..] index sets named by the program
-- ARGV[1]  number of candidate ids n; ARGV[2..n+1] the ids; ARGV[n+2..] the program
--          (read by _common.lua's fold; B means A here).
-- Returns {id, record, id, record, ...} for the candidates that match and exist.
local n = tonumber(ARGV[1])
local result = {}
local id, raw, record = nil, nil, nil

-- What each op means for the candidate id (its record raw, decoded on demand).
local test = {
  set = function(key) return redis.call('SISMEMBER', key, id) == 1 end,
  user = function(user)
    record = record or decode_record(raw) or {}
    return record[F_USER] == user
  end,
  all = function() return true end,
  connection = function(other) return other == id end,
  ids = function(list)
    for _, other in ipairs(list) do
      if other == id then return true end
    end
    return false
  end,
  both = function(left, right) return left and right end,
  either = function(left, right) return left or right end,
}

for i = 2, n + 1 do
  id, raw, record = ARGV[i], get_record(ARGV[i]), nil
  if raw and fold(n + 2, #ARGV, 0, test) then
    result[#result + 1] = id
    result[#result + 1] = raw
  end
end
return result

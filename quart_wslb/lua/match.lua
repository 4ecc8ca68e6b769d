-- Filter candidate connection ids through a compiled selector; return their records.
-- Used for paged queries: the caller scans a driver page by page and asks here which
-- candidates match, so no reply is ever larger than a page.
-- KEYS[1]  hash: user -> connection ids
-- KEYS[2]  hash: the instances (unused here; the layout is send.lua's)
-- KEYS[3..] index sets named by the program
-- ARGV[1]  number of candidate ids n; ARGV[2..n+1] the ids; ARGV[n+2..] the program
--          (postfix as in send.lua; B is treated as A).
-- Returns {id, record, id, record, ...} for the candidates that match and exist.
local n = tonumber(ARGV[1])
local result = {}
for i = 2, n + 1 do
  local id = ARGV[i]
  local raw = get_record(id)
  if raw then
    local stack, record = {}, nil
    for j = n + 2, #ARGV do
      local op = ARGV[j]
      local code = string.sub(op, 1, 1)
      if code == 'S' then
        stack[#stack + 1] = redis.call('SISMEMBER', KEYS[tonumber(string.sub(op, 2))], id) == 1
      elseif code == 'U' then
        record = record or decode_record(raw) or {}
        stack[#stack + 1] = record.u == string.sub(op, 2)
      elseif code == 'A' or code == 'B' then
        stack[#stack + 1] = true
      elseif code == 'C' then
        stack[#stack + 1] = string.sub(op, 2) == id
      elseif op == '&' or op == '|' then
        local right, left = table.remove(stack), table.remove(stack)
        if code == '&' then stack[#stack + 1] = left and right
        else stack[#stack + 1] = left or right end
      else
        error('unknown selector op ' .. string.sub(op, 1, 40))
      end
    end
    if stack[1] then
      result[#result + 1] = id
      result[#result + 1] = raw
    end
  end
end
return result

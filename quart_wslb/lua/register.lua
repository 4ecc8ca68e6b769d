-- Register one connection in one round trip.
-- KEYS[1]  hash: connection id -> record
-- KEYS[2]  hash: user -> connection count (presence)
-- KEYS[3..] every index set the connection belongs to (the record's "k" lists them)
-- ARGV[1]  connection id, ARGV[2] record (JSON), ARGV[3] user ("" for none)
-- Returns 1 when this made the user present in the cluster (first connection), else 0.
-- Registering again (a repair) rewrites the record, counts the user once, and takes the
-- connection out of sets that the old record listed and the new one does not.
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local keep = {}
  for i = 3, #KEYS do keep[KEYS[i]] = true end
  local ok, record = pcall(cjson.decode, old)
  if ok and type(record) == 'table' and type(record.k) == 'table' then
    for _, key in ipairs(record.k) do
      if not keep[key] then redis.call('SREM', key, ARGV[1]) end
    end
  end
end
local created = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[1])
end
if created == 1 and ARGV[3] ~= '' then
  if redis.call('HINCRBY', KEYS[2], ARGV[3], 1) == 1 then return 1 end
end
return 0

-- Register one connection in one round trip.
-- KEYS[1]  hash: user -> connection ids (presence)
-- KEYS[2]  hash: token -> record, of the owning instance
-- KEYS[3..] every index set the connection belongs to (index_keys of its record); their
--          holders (holders_of) are kept too
-- Also lists the owning instance in <ROOT>:instances, if it is not there yet.
-- ARGV[1]  connection id, ARGV[2] token, ARGV[3] record (JSON), ARGV[4] user ("" for none)
-- Returns 1 when this made the user present in the cluster (first connection), else 0.
-- Registering again (a repair) rewrites the record and takes the connection out of the
-- sets and the user that the old record named and the new one does not.
local id = ARGV[1]
local old = decode_record(redis.call('HGET', KEYS[2], ARGV[2]) or nil)
if old then
  local keep = {}
  for i = 3, #KEYS do keep[KEYS[i]] = true end
  for _, key in ipairs(index_keys(old)) do
    if not keep[key] then index_remove(key, id) end
  end
  local user = old[F_USER]
  if type(user) == 'string' and user ~= ARGV[4] then user_remove(user, id) end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
-- Lists the owner among the instances even before its first heartbeat: queries of
-- everyone walk that list, and a crash before the heartbeat still gets reaped.
redis.call('HSETNX', ROOT .. ':' .. W_INSTANCES, instance_of(id), '{}')
for i = 3, #KEYS do
  index_add(KEYS[i], id)
end
if ARGV[4] ~= '' then return user_add(ARGV[4], id) end
return 0

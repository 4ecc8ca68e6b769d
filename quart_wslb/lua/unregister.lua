-- Remove connections and every index entry their records list; safe to run twice,
-- and from several instances at once (each step is a no-op when already done).
-- KEYS[1]  hash: connection id -> record
-- KEYS[2]  optional: the owning instance's set, cleaned even where a record is missing
-- ARGV     connection ids
-- Returns how many records were removed.
local removed = 0
for i = 1, #ARGV do
  local id = ARGV[i]
  local raw = redis.call('HGET', KEYS[1], id)
  if raw then
    for _, key in ipairs(cjson.decode(raw).k) do
      redis.call('SREM', key, id)
    end
    redis.call('HDEL', KEYS[1], id)
    removed = removed + 1
  end
  if KEYS[2] then
    redis.call('SREM', KEYS[2], id)
  end
end
return removed

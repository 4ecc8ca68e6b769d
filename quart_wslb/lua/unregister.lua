-- Remove connections and every index entry their records list; safe to run twice,
-- and from several instances at once (each step is a no-op when already done).
-- KEYS[1]  hash: connection id -> record
-- KEYS[2]  hash: user -> connection count (presence)
-- KEYS[3]  optional: the owning instance's set, cleaned even where a record is missing
-- ARGV     connection ids
-- Returns {records removed, users whose last connection this removed...}.
local removed, offline = 0, {}
for i = 1, #ARGV do
  local id = ARGV[i]
  local raw = redis.call('HGET', KEYS[1], id)
  if raw then
    -- A record that is not ours (corrupt, or written by hand) is still removed.
    local ok, record = pcall(cjson.decode, raw)
    if not ok or type(record) ~= 'table' then record = {} end
    for _, key in ipairs(type(record.k) == 'table' and record.k or {}) do
      redis.call('SREM', key, id)
    end
    redis.call('HDEL', KEYS[1], id)
    removed = removed + 1
    if type(record.u) == 'string' then
      if redis.call('HINCRBY', KEYS[2], record.u, -1) <= 0 then
        redis.call('HDEL', KEYS[2], record.u)
        offline[#offline + 1] = record.u
      end
    end
  end
  if KEYS[3] then
    redis.call('SREM', KEYS[3], id)
  end
end
return {removed, offline}

-- Remove connections and every index entry their records name; safe to run twice,
-- and from several instances at once (each step is a no-op when already done).
-- KEYS[1]  hash: user -> connection ids (presence)
-- ARGV     connection ids
-- Returns {records removed, users whose last connection this removed...}.
local removed, offline = 0, {}
for i = 1, #ARGV do
  local id = ARGV[i]
  local key, token = record_at(id)
  local raw = key and redis.call('HGET', key, token)
  if raw then
    -- A record that is not ours (corrupt, or written by hand) is still removed.
    local record = decode_record(raw) or {}
    for _, set in ipairs(index_keys(record)) do
      index_remove(set, id)
    end
    redis.call('HDEL', key, token)
    removed = removed + 1
    local user = record[F_USER]
    if type(user) == 'string' and user_remove(user, id) == 1 then
      offline[#offline + 1] = user
    end
  end
end
return {removed, offline}

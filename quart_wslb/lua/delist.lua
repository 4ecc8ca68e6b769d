-- Take an instance off the list once nothing of it is left: no heartbeat and no records.
-- Conditional, so that a connection it registered meanwhile (register.lua lists its owner
-- again) is never left unlisted, where no survivor would ever reap it.
-- KEYS[1] the instances hash, KEYS[2] its heartbeat, KEYS[3] its hash of records.
-- ARGV[1] the instance id. Returns 1 if it was taken off the list.
if redis.call('EXISTS', KEYS[2]) == 0 and redis.call('HLEN', KEYS[3]) == 0 then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0

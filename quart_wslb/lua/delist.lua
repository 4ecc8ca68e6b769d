-- Take an instance off the list once nothing of it is left: no heartbeat and no records.
-- Conditional, so that a connection it registered meanwhile (register.lua lists its owner
-- again) is never left unlisted, where no survivor would ever reap it. The last instance
-- to go takes the layout marker with it, so a stopped cluster leaves no keys.
-- KEYS[1] the instances hash, KEYS[2] its heartbeat, KEYS[3] its hash of records,
-- KEYS[4] the layout marker. ARGV[1] the instance id. Returns 1 if it was taken off.
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('HLEN', KEYS[3]) > 0 then
  return 0
end
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[4])
end
return removed

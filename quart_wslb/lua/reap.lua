-- Claim the reaping of a dead instance: only one survivor reaps it, and never while
-- its heartbeat is back. KEYS[1] its heartbeat, KEYS[2] the reap lock.
-- ARGV[1] claimant instance id, ARGV[2] lock lifetime in ms. Returns 1 if claimed.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
-- A reap of ours that a tick's time limit cut short goes on.
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0

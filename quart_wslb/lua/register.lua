-- Register one connection in one round trip.
-- KEYS[1]  hash: connection id -> record
-- KEYS[2..] every index set the connection belongs to (the record's "k" lists them)
-- ARGV[1]  connection id, ARGV[2] record (JSON)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[1])
end
return #KEYS - 1

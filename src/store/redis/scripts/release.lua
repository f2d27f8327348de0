-- Gives a record up for its owner, then wakes its waiters.
-- KEYS: record, wake queue. ARGV: owner (16).
local v = redis.call('GET', KEYS[1])
if not v or string.byte(v, 1) ~= 70 or string.sub(v, 2, 17) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])

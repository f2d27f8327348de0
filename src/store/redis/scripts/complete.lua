-- Completes a record for its owner, then wakes its waiters.
-- KEYS: record, wake queue. ARGV: owner (16), record, retention ms.
local v = redis.call('GET', KEYS[1])
if not v or string.byte(v, 1) ~= 70 or string.sub(v, 2, 17) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])

-- Completes a record for its owner (1), then wakes its waiters; 0 when not
-- the owner, 2 when this very record is there already (a retry whose WAIT
-- failed, see RedisStore::complete).
-- KEYS: record, wake queue. ARGV: owner (16), record, retention ms.
local v = redis.call('GET', KEYS[1])
if v == ARGV[2] then return 2 end
if not v or string.byte(v, 1) ~= 70 or string.sub(v, 2, 17) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])

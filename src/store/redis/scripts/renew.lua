-- Extends a record's lease for its owner.
-- KEYS: record. ARGV: owner (16), lease ms.
local v = redis.call('GET', KEYS[1])
if not v or string.byte(v, 1) ~= 70 or string.sub(v, 2, 17) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1

-- Counts one more waiter in the in-flight value (up to 47) and answers 1, or
-- answers 0 when the record is not in flight.
-- KEYS: record.
local v = redis.call('GET', KEYS[1])
if not v or string.byte(v, 1) ~= 70 then return 0 end
local n = string.byte(v, 50)
if n < 47 then
  redis.call('SET', KEYS[1], string.sub(v, 1, 49) .. string.char(n + 1) .. string.sub(v, 51), 'KEEPTTL')
end
return 1

-- The end of complete.lua and release.lua: wakes the waiters counted in the
-- in-flight value `v` by pushing to the queue KEYS[2]. A count of 48 or
-- more is an older value's first token digit, not a count.
local n = string.byte(v, 50)
if n > 0 and n < 48 then
  for i = 1, n do redis.call('RPUSH', KEYS[2], '1') end
  redis.call('PEXPIRE', KEYS[2], 1000)
end
return 1

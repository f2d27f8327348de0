-- Claims a record: the in-flight value when absent (or completed, with the
-- replace flag), else the value found. The store sends it only for a Rerun
-- take-over (replace flag 1); other claims are a transaction (mod.rs).
-- KEYS: record, fence counter.
-- ARGV: owner (16 bytes), fingerprint (32) and a zero waiter count (1),
-- lease ms, replace flag.
-- Reply: the token (an integer) when acquired, else the value found: an
-- in-flight value (it starts with `F`) or a completed record.
-- Kept small on purpose: every call, string and table costs Redis CPU on
-- each first execution (BENCHMARKS.md).
local v = redis.call('GET', KEYS[1])
if v and (string.byte(v, 1) == 70 or ARGV[4] ~= '1') then return v end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], 'F' .. ARGV[1] .. ARGV[2] .. string.format('%d', t), 'PX', ARGV[3])
return t

-- Adds a device and answers 1 when the user had no live device before.
-- KEYS: devs · ARGV: member, expires, now, ttl
local live = redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[3], '+inf')
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
if mine and tonumber(mine) > tonumber(ARGV[3]) then live = live - 1 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if live == 0 then return 1 else return 0 end

-- Removes every device of a dead node from one user; answers 1 when the user has no live
-- device left (last seen is set).
-- KEYS: devs, seen · ARGV: node, now, seen ttl (s)
local removed = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local node = string.match(m, '^(.*)|[^|]*|[^|]*$')
  if node == ARGV[1] then
    redis.call('ZREM', KEYS[1], m)
    removed = removed + 1
  end
end
if removed == 0 then return 0 end
if redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[2], '+inf') > 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1

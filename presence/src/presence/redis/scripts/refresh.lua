-- Re-adds a device (heartbeat, or after Redis lost it) and pushes the key's TTL out.
-- Answers 1 when the device was gone or expired (it could not be located), 0 otherwise.
-- KEYS: devs · ARGV: member, expires, ttl
local before = redis.call('ZSCORE', KEYS[1], ARGV[1])
local lost = (not before) or (tonumber(before) < tonumber(ARGV[2]) - tonumber(ARGV[3]))
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if lost then
  return 1
end
return 0

-- Re-adds a device (heartbeat, or after Redis lost it) and pushes the key's TTL out.
-- KEYS: devs · ARGV: member, expires, ttl
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1

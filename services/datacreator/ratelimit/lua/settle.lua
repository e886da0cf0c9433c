-- KEYS: tokens zset, token sum. ARGV: old member, new member, delta.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], score, ARGV[2])
redis.call('INCRBY', KEYS[2], tonumber(ARGV[3]))
return 1

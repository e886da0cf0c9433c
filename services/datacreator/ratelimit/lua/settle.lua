-- KEYS: tokens zset, token sum, token pacing schedule. ARGV: old member, new member, delta,
-- token_interval_ms (the schedule gives back what a call did not use).
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], score, ARGV[2])
redis.call('INCRBY', KEYS[2], tonumber(ARGV[3]))
local ttat = redis.call('GET', KEYS[3])
if ttat then
  local ttl = redis.call('PTTL', KEYS[3])
  if ttl > 0 then
    redis.call('SET', KEYS[3], tostring(tonumber(ttat) + tonumber(ARGV[3]) * tonumber(ARGV[4])), 'PX', ttl)
  end
end
return 1

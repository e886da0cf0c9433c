-- Pauses every admission for ARGV[1] ms (a provider's Retry-After); a longer hold already set stays.
-- KEYS: the hold key.
local ms = math.ceil(tonumber(ARGV[1]))
if ms > 0 and redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
end
return redis.call('PTTL', KEYS[1])

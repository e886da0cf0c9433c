-- The limits the provider announces (x-ratelimit-limit-*), already capped at the configured ones:
-- every replica's acquire enforces them. A limit of 0 means "as configured".
-- KEYS: the announced-limits hash. ARGV: requests, tokens, ttl_ms.
for i, field in ipairs({'requests', 'tokens'}) do
  local limit = tonumber(ARGV[i])
  if limit > 0 then
    redis.call('HSET', KEYS[1], field, limit)
  else
    redis.call('HDEL', KEYS[1], field)
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
return 1

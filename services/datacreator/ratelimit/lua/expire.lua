-- Prelude of every script: drops what left the window; then `count` and `used` are what the
-- window holds now, and touch() keeps the keys alive for one more window.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local span = tonumber(ARGV[3])
local cutoff = now - span
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
if #old > 0 then
  for _, m in ipairs(old) do used = used - tonumber(string.match(m, '|(%d+)$')) end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
end
if used < 0 or redis.call('ZCARD', KEYS[2]) == 0 then used = 0 end
local count = redis.call('ZCARD', KEYS[1])
local ttl = math.ceil(span) + 1000
local function touch()
  redis.call('SET', KEYS[3], used, 'PX', ttl)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end

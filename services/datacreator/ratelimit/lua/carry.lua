-- A replica back from an outage adds what it admitted on its own, so the shared window counts it,
-- and marks every other live replica as away: until one is admitting through Redis again, its
-- share of the limit is kept free for what it may be admitting locally.
-- KEYS: requests zset, tokens zset, token sum, members, away.
-- ARGV: member, n, span_ms, ttl_ms, then n pairs (age_ms, tokens). Returns {count, used}.
local me = ARGV[1]
local ttl_ms = tonumber(ARGV[4])
for i = 1, tonumber(ARGV[2]) do
  local age = tonumber(ARGV[3 + 2 * i])
  local tokens = math.floor(tonumber(ARGV[4 + 2 * i]))
  if age < span then
    local name = 'carried:' .. me .. ':' .. now .. ':' .. i
    redis.call('ZADD', KEYS[1], now - age, name)
    redis.call('ZADD', KEYS[2], now - age, name .. '|' .. tokens)
    used = used + tokens
    count = count + 1
  end
end
touch()
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
redis.call('ZADD', KEYS[4], now + ttl_ms, me)
redis.call('PEXPIRE', KEYS[4], ttl_ms)
local members = redis.call('ZRANGE', KEYS[4], 0, -1)
redis.call('HDEL', KEYS[5], me)
for _, m in ipairs(members) do
  if m ~= me then redis.call('HSET', KEYS[5], m, tostring(1 / #members)) end
end
redis.call('PEXPIRE', KEYS[5], ttl_ms)
return {count, used}

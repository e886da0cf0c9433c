-- KEYS: requests zset, tokens zset, token sum, pacing schedule, hold.
-- ARGV: rpm, tpm, span_ms, tokens, id, interval_ms, burst_ms (0 = no limit).
-- Returns {admitted, wait_ms or admitted_at_ms, requests in window, tokens in window}.
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local tokens = tonumber(ARGV[4])
local interval = tonumber(ARGV[6])
local burst = tonumber(ARGV[7])
local tat = tonumber(redis.call('GET', KEYS[4]) or '0')
if tat < now then tat = now end
local wait = 0
local held = redis.call('PTTL', KEYS[5])
if held > 0 then wait = held end
if rpm > 0 and tat - now > burst then
  wait = tat - now - burst
end
if rpm > 0 and count >= rpm then
  local e = redis.call('ZRANGE', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
  local w = tonumber(e[2]) + span - now
  if w > wait then wait = w end
end
if tpm > 0 and used + tokens > tpm then
  local excess = used + tokens - tpm
  local freed = 0
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    freed = freed + tonumber(string.match(entries[i], '|(%d+)$'))
    if freed >= excess then
      local w = tonumber(entries[i + 1]) + span - now
      if w > wait then wait = w end
      break
    end
  end
end
if wait > 0 then
  touch()
  return {0, tostring(wait), count, used}
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('ZADD', KEYS[2], now, ARGV[5] .. '|' .. tokens)
redis.call('SET', KEYS[4], tostring(tat + interval), 'PX', ttl)
used = used + tokens
touch()
return {1, tostring(now), count + 1, used}

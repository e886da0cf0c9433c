-- KEYS: requests zset, tokens zset, token sum, pacing schedule, hold, token pacing schedule, members, away,
-- announced limits.
-- ARGV: rpm, tpm, span_ms, tokens, id, interval_ms, burst_ms (0 = no limit), token_interval_ms,
-- token_burst_ms, member, member_ttl_ms (rpm and tpm as configured).
-- Returns {admitted, wait_ms or admitted_at_ms, requests in window, tokens in window, live members,
-- rpm, tpm (as enforced)}.
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local tokens = tonumber(ARGV[4])
local interval = tonumber(ARGV[6])
local burst = tonumber(ARGV[7])
local tat = tonumber(redis.call('GET', KEYS[4]) or '0')
if tat < now then tat = now end
local token_interval = tonumber(ARGV[8])
local token_burst = tonumber(ARGV[9])
local ttat = tonumber(redis.call('GET', KEYS[6]) or '0')
if ttat < now then ttat = now end
-- A lower limit the provider announced (announce.lua): enforced, and paced at its rate.
local announced = redis.call('HMGET', KEYS[9], 'requests', 'tokens')
local announced_rpm, announced_tpm = tonumber(announced[1]), tonumber(announced[2])
if rpm > 0 and announced_rpm and announced_rpm < rpm then
  interval = interval * rpm / announced_rpm
  rpm = announced_rpm
end
if tpm > 0 and announced_tpm and announced_tpm < tpm then
  token_interval = token_interval * tpm / announced_tpm
  tpm = announced_tpm
end
local enforced_rpm, enforced_tpm = rpm, tpm
redis.call('ZADD', KEYS[7], now + tonumber(ARGV[11]), ARGV[10])
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now)
redis.call('PEXPIRE', KEYS[7], tonumber(ARGV[11]))
local members = redis.call('ZCARD', KEYS[7])
-- Replicas still on their local share after an outage (see carry.lua): keep their part free.
redis.call('HDEL', KEYS[8], ARGV[10])
local away = 0
local marked = redis.call('HGETALL', KEYS[8])
for i = 1, #marked, 2 do
  if redis.call('ZSCORE', KEYS[7], marked[i]) then
    away = away + tonumber(marked[i + 1])
  else
    redis.call('HDEL', KEYS[8], marked[i])
  end
end
if away > 0 then
  if rpm > 0 then rpm = math.max(1, math.floor(rpm * (1 - away))) end
  if tpm > 0 then tpm = math.max(1, math.floor(tpm * (1 - away))) end
end
local wait = 0
if tpm > 0 and ttat - now > token_burst then
  wait = ttat - now - token_burst
end
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
  return {0, tostring(wait), count, used, members, enforced_rpm, enforced_tpm}
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('ZADD', KEYS[2], now, ARGV[5] .. '|' .. tokens)
redis.call('SET', KEYS[4], tostring(tat + interval), 'PX', ttl)
redis.call('SET', KEYS[6], tostring(ttat + tokens * token_interval), 'PX', ttl)
used = used + tokens
touch()
return {1, tostring(now), count + 1, used, members, enforced_rpm, enforced_tpm}

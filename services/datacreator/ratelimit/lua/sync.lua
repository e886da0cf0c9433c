-- Holds what the provider counts and we do not, until the provider's reset.
-- ARGV: rpm, tpm, span_ms, remaining_requests, reset_requests_ms, remaining_tokens, reset_tokens_ms, id
-- (a remaining of -1 means unknown).
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local rem_req = tonumber(ARGV[4])
local rem_tok = tonumber(ARGV[6])
local added = 0
if rpm > 0 and rem_req >= 0 then
  local deficit = (rpm - count) - rem_req
  local score = now + tonumber(ARGV[5]) - span
  for i = 1, deficit do
    redis.call('ZADD', KEYS[1], score, 'hold:' .. ARGV[8] .. ':' .. i)
    added = added + 1
  end
end
if tpm > 0 and rem_tok >= 0 then
  local deficit = math.floor((tpm - used) - rem_tok)
  if deficit >= 1 then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]) - span, 'hold:' .. ARGV[8] .. '|' .. deficit)
    used = used + deficit
    added = added + 1
  end
end
touch()
return {added, count, used}

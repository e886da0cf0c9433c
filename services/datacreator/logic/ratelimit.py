"""Requests-per-minute and tokens-per-minute limits, enforced before a call is sent.

Every limiter here is a sliding-window log: a call is admitted only when the calls (and their
tokens) admitted during the last window, plus this one, fit the limit. Unlike a token bucket,
that never lets more than the limit through in any window, whatever the phase, so a provider
that counts the same way never answers 429. The window is a constructor parameter so tests and
benchmarks can use short ones; a small margin is added to it because a call reaches the provider
a little after it was admitted here.

Requests are also paced (GCRA: one every window/rpm, with a small burst allowance). Without it the
first window's burst repeats every window, and a burst reaches the provider spread out by its own
queueing, so the provider's window and ours drift apart by more than the margin. Paced calls
arrive as they were sent, and the whole quota is still used.

- `LocalRateLimiter`: one process.
- `RedisRateLimiter`: one limit shared by every generator replica, atomic in a Lua script on
  Redis's own clock.
- `FailoverRateLimiter`: the shared one, with a local share of the limit while Redis is away.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from datacreator import metrics

log = logging.getLogger("datacreator.ratelimit")

DEFAULT_WINDOW_S = 60.0
REQUESTS = "requests"
TOKENS = "tokens"


@dataclass
class Reservation:
    """What one admitted call holds against the limits."""

    tokens: int
    waited_s: float = 0.0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    source: str = "local"  # local | shared | none
    # The window as this limiter saw it right after admitting the call: what the provider's
    # x-ratelimit-remaining-* headers on its answer are compared with.
    requests_in_window: int | None = None
    tokens_in_window: int | None = None
    _handle: Any = field(default=None, repr=False)


@runtime_checkable
class RateLimiter(Protocol):
    async def acquire(self, tokens: int) -> Reservation: ...

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None: ...

    def observe_headers(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None: ...

    def usage_ratio(self) -> dict[str, float]: ...

    async def aclose(self) -> None: ...


class RateLimiterUnavailable(ConnectionError):
    """The shared limiter's store cannot be reached."""


def default_margin(window_s: float) -> float:
    """Extra window length covering the delay between admission here and arrival at the provider."""
    return min(max(0.005 * window_s, 0.05), 0.5)


def default_burst(span_s: float, rpm: int | None) -> float:
    """How far (seconds) request pacing may run ahead of its schedule: a few requests' worth."""
    if not rpm:
        return 0.0
    return max(3 * span_s / rpm, 0.01 * span_s)


# ---------------------------------------------------------------------------------------------
# Provider headers


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: str | None) -> float | None:
    """Seconds in `1s`, `6m0s`, `250ms`, `0.5` (seconds), or an epoch timestamp; None when unreadable."""
    if value is None:
        return None
    text = value.strip().lower()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return None
        return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if number > 1e9:  # an epoch timestamp rather than a duration
        return max(0.0, number - time.time())
    return max(0.0, number)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a 429 or 503 asks to wait: `retry-after-ms`, then `retry-after` (seconds or an HTTP date)."""
    h = _lower(headers)
    if "retry-after-ms" in h:
        try:
            return max(0.0, float(h["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = h.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class ProviderView:
    """What the provider says is left, read from `x-ratelimit-*` headers."""

    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> "ProviderView":
        h = _lower(headers)
        return cls(
            remaining_requests=_int(h.get("x-ratelimit-remaining-requests")),
            reset_requests_s=parse_duration(h.get("x-ratelimit-reset-requests")),
            remaining_tokens=_int(h.get("x-ratelimit-remaining-tokens")),
            reset_tokens_s=parse_duration(h.get("x-ratelimit-reset-tokens")),
        )

    def reset_after(self) -> float | None:
        """Seconds until the provider's limits recover (the later of the two), for a 429 without Retry-After."""
        values = [v for v in (self.reset_requests_s, self.reset_tokens_s) if v is not None]
        return max(values) if values else None


def _in_window(reservation: Reservation | None, requests_now: float, tokens_now: float) -> tuple[float, float]:
    if reservation is None or reservation.requests_in_window is None:
        return requests_now, tokens_now
    return reservation.requests_in_window, reservation.tokens_in_window or 0


def _reset(seconds: float | None, window_s: float) -> float:
    return window_s if seconds is None else seconds


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# No limits


class NoopRateLimiter:
    """For endpoints without configured limits: admits everything at once."""

    async def acquire(self, tokens: int) -> Reservation:
        return Reservation(tokens=tokens, source="none")

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        return None

    def observe_headers(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None:
        return None

    def usage_ratio(self) -> dict[str, float]:
        return {}

    async def aclose(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# In-process


class _Log:
    """Weighted admissions in a sliding window, plus holds that expire at a set time."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self.events: deque[list[float]] = deque()  # [admitted_at, weight], in admission order
        self.total = 0.0
        self.holds: list[tuple[float, float]] = []  # (expires_at, weight)

    def expire(self, now: float) -> None:
        cutoff = now - self.span_s
        events = self.events
        while events and events[0][0] <= cutoff:
            self.total -= events.popleft()[1]
        if self.holds:
            self.holds = [h for h in self.holds if h[0] > now]
        if not events:
            self.total = 0.0  # no float drift across quiet periods

    def used(self) -> float:
        return self.total + sum(w for _, w in self.holds)

    def wait(self, need: float, limit: float, now: float) -> float:
        """Seconds until `need` more fits under `limit`."""
        excess = self.used() + need - limit
        if excess <= 1e-9:
            return 0.0
        if self.holds:
            expiries = sorted([(t + self.span_s, w) for t, w in self.events] + self.holds)
        else:
            expiries = ((t + self.span_s, w) for t, w in self.events)
        freed = 0.0
        for expires_at, weight in expiries:
            freed += weight
            if freed >= excess - 1e-9:
                return max(expires_at - now, 0.0)
        return self.span_s  # cannot happen while need <= limit; wait a window to be safe

    def add(self, now: float, weight: float) -> list[float]:
        entry = [now, weight]
        self.events.append(entry)
        self.total += weight
        return entry

    def hold(self, weight: float, expires_at: float) -> None:
        self.holds.append((expires_at, weight))


class _WindowLimits:
    """The limits, window, margin and pacing burst that the local and the shared limiter both keep."""

    def __init__(
        self, rpm: int | None, tpm: int | None, window_s: float, margin_s: float | None, burst_s: float | None, alias: str
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.window_s = window_s
        self.margin_s = default_margin(window_s) if margin_s is None else margin_s
        self.alias = alias
        self._span_s = window_s + self.margin_s
        self.burst_s = default_burst(self._span_s, rpm) if burst_s is None else burst_s

    def _clamp(self, tokens: int) -> int:
        tokens = max(int(tokens), 0)
        return min(tokens, self.tpm) if self.tpm else tokens

    def usage_ratio(self) -> dict[str, float]:
        raise NotImplementedError

    def _publish(self) -> None:
        for kind, ratio in self.usage_ratio().items():
            metrics.ratelimit_usage_ratio.labels(self.alias, kind).set(ratio)


class LocalRateLimiter(_WindowLimits):
    """Requests and tokens per window, in this process only. Waiters are served first come, first served."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        margin_s: float | None = None,
        burst_s: float | None = None,
        alias: str = "default",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(rpm, tpm, window_s, margin_s, burst_s, alias)
        self._clock = clock
        self._requests = _Log(self._span_s)
        self._tokens = _Log(self._span_s)
        self._interval = self._span_s / rpm if rpm else 0.0
        self._tat = 0.0  # when the next request is due by the pacing schedule
        self._hold_until = 0.0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    def _wait(self, now: float, tokens: int) -> float:
        self._requests.expire(now)
        self._tokens.expire(now)
        wait = max(self._hold_until - now, 0.0)
        if self.rpm:
            wait = max(wait, self._tat - now - self.burst_s, self._requests.wait(1, self.rpm, now))
        if self.tpm:
            wait = max(wait, self._tokens.wait(tokens, self.tpm, now))
        return wait

    async def acquire(self, tokens: int) -> Reservation:
        tokens = self._clamp(tokens)
        started = self._clock()
        async with self._lock:
            while True:
                now = self._clock()
                wait = self._wait(now, tokens)
                if wait <= 0:
                    break
                self._changed.clear()
                try:  # a settle that frees tokens wakes the head of the queue early
                    await asyncio.wait_for(self._changed.wait(), wait)
                except TimeoutError:
                    pass
            self._requests.add(now, 1)
            self._tat = max(self._tat, now) + self._interval
            entry = self._tokens.add(now, tokens)
            in_window = (round(self._requests.used()), round(self._tokens.used()))
        self._publish()
        return Reservation(
            tokens=tokens, waited_s=now - started, source="local",
            requests_in_window=in_window[0], tokens_in_window=in_window[1], _handle=entry,
        )

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        entry = reservation._handle
        if entry is None:
            return
        now = self._clock()
        self._tokens.expire(now)
        actual = self._clamp(actual_tokens)
        if entry[0] > now - self._tokens.span_s and entry[1] != actual:  # still counted
            self._tokens.total += actual - entry[1]
            entry[1] = actual
            reservation.tokens = actual
            self._changed.set()
        self._publish()

    def hold(self, seconds: float) -> None:
        """Admit nothing for `seconds` (the provider asked us to back off)."""
        self._hold_until = max(self._hold_until, self._clock() + seconds)

    def observe_headers(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None:
        view = ProviderView.from_headers(headers)
        if view.remaining_requests is None and view.remaining_tokens is None:
            return
        now = self._clock()
        self._requests.expire(now)
        self._tokens.expire(now)
        # The headers describe the provider's window when it admitted the call, so they are
        # compared with ours at that moment. The provider counts something we did not (another
        # client on the same key, a different tokenizer): hold the difference until its reset.
        ours_requests, ours_tokens = _in_window(reservation, self._requests.used(), self._tokens.used())
        if self.rpm and view.remaining_requests is not None:
            deficit = (self.rpm - ours_requests) - view.remaining_requests
            if deficit >= 1:
                self._requests.hold(deficit, now + _reset(view.reset_requests_s, self.window_s))
        if self.tpm and view.remaining_tokens is not None:
            deficit = (self.tpm - ours_tokens) - view.remaining_tokens
            if deficit >= 1:
                self._tokens.hold(deficit, now + _reset(view.reset_tokens_s, self.window_s))

    def usage_ratio(self) -> dict[str, float]:
        now = self._clock()
        ratios: dict[str, float] = {}
        if self.rpm:
            self._requests.expire(now)
            ratios[REQUESTS] = self._requests.used() / self.rpm
        if self.tpm:
            self._tokens.expire(now)
            ratios[TOKENS] = self._tokens.used() / self.tpm
        return ratios

    async def aclose(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Shared through Redis

# Drops what left the window; on return `count` and `used` are what the window holds now.
_EXPIRE_LUA = """
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
"""

# KEYS: requests zset, tokens zset, token sum, pacing schedule.
# ARGV: rpm, tpm, span_ms, tokens, id, interval_ms, burst_ms (0 = no limit).
# Returns {admitted, wait_ms or admitted_at_ms, requests in window, tokens in window}.
_ACQUIRE_LUA = _EXPIRE_LUA + """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local tokens = tonumber(ARGV[4])
local interval = tonumber(ARGV[6])
local burst = tonumber(ARGV[7])
local tat = tonumber(redis.call('GET', KEYS[4]) or '0')
if tat < now then tat = now end
local wait = 0
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
"""

# KEYS: tokens zset, token sum. ARGV: old member, new member, delta.
_SETTLE_LUA = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], score, ARGV[2])
redis.call('INCRBY', KEYS[2], tonumber(ARGV[3]))
return 1
"""

# Holds what the provider counts and we do not, until the provider's reset.
# ARGV: rpm, tpm, span_ms, remaining_requests, reset_requests_ms, remaining_tokens, reset_tokens_ms, id
# (a remaining of -1 means unknown).
_SYNC_LUA = _EXPIRE_LUA + """
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
"""

_REDIS_ERRORS: tuple[type[BaseException], ...]
try:
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as _RedisConnectionError
    from redis.exceptions import TimeoutError as _RedisTimeoutError

    _REDIS_ERRORS = (_RedisConnectionError, _RedisTimeoutError, OSError, TimeoutError)
except ImportError:  # pragma: no cover - redis is a dependency
    aioredis = None  # type: ignore[assignment]
    _REDIS_ERRORS = (OSError, TimeoutError)


class RedisRateLimiter(_WindowLimits):
    """One sliding-window limit shared by every replica through Redis.

    Each decision is one Lua script run on Redis's clock, so replicas' clocks do not matter and two
    replicas never admit the same slot. Only one coroutine per replica polls Redis at a time; the
    others queue behind it in order.
    """

    def __init__(
        self,
        redis_url: str,
        key_prefix: str,
        rpm: int | None,
        tpm: int | None,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        margin_s: float | None = None,
        burst_s: float | None = None,
        alias: str = "default",
        op_timeout_s: float = 1.0,
        max_poll_s: float = 0.25,
        fail_fast_s: float = 1.0,
    ) -> None:
        if aioredis is None:  # pragma: no cover
            raise RuntimeError("the redis package is required for a shared rate limit")
        super().__init__(rpm, tpm, window_s, margin_s, burst_s, alias)
        self.key_prefix = key_prefix
        # One hash tag keeps the three keys in one slot of a Redis Cluster.
        self.keys = [
            f"{{{key_prefix}}}:requests", f"{{{key_prefix}}}:tokens", f"{{{key_prefix}}}:token_sum", f"{{{key_prefix}}}:tat",
        ]
        self._span_ms = self._span_s * 1000
        self._interval_ms = self._span_ms / rpm if rpm else 0.0
        self._op_timeout_s = op_timeout_s
        self._max_poll_s = max_poll_s
        self._fail_fast_s = fail_fast_s
        self._down_until = 0.0
        self._redis = aioredis.Redis.from_url(
            redis_url, socket_timeout=op_timeout_s, socket_connect_timeout=op_timeout_s, retry_on_timeout=False
        )
        self._acquire_script = self._redis.register_script(_ACQUIRE_LUA)
        self._settle_script = self._redis.register_script(_SETTLE_LUA)
        self._sync_script = self._redis.register_script(_SYNC_LUA)
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._count = 0
        self._used = 0
        self._hold_until = 0.0
        self._sync_task: asyncio.Task[None] | None = None

    async def _run(self, call: Callable[[], Awaitable[Any]]) -> Any:
        if time.monotonic() < self._down_until:
            raise RateLimiterUnavailable("shared rate limiter store unreachable (recent failure)")
        try:
            async with asyncio.timeout(self._op_timeout_s * 2):
                return await call()
        except _REDIS_ERRORS as exc:
            self._down_until = time.monotonic() + self._fail_fast_s
            raise RateLimiterUnavailable(f"shared rate limiter store unreachable: {type(exc).__name__}: {exc}") from None

    async def acquire(self, tokens: int) -> Reservation:
        tokens = self._clamp(tokens)
        started = time.monotonic()
        rid = uuid.uuid4().hex
        args = [self.rpm or 0, self.tpm or 0, self._span_ms, tokens, rid, self._interval_ms, self.burst_s * 1000]
        async with self._lock:
            while True:
                hold = self._hold_until - time.monotonic()
                if hold > 0:
                    await asyncio.sleep(hold)
                admitted, value, count, used = await self._run(lambda: self._acquire_script(keys=self.keys, args=args))
                self._count, self._used = int(count), int(used)
                if int(admitted):
                    break
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), min(float(value) / 1000, self._max_poll_s))
                except TimeoutError:
                    pass
        self._publish()
        return Reservation(
            tokens=tokens, waited_s=time.monotonic() - started, id=rid, source="shared",
            requests_in_window=self._count, tokens_in_window=self._used, _handle=f"{rid}|{tokens}",
        )

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        member = reservation._handle
        actual = self._clamp(actual_tokens)
        if not isinstance(member, str) or actual == reservation.tokens:
            return
        new_member = f"{reservation.id}|{actual}"
        args = [member, new_member, actual - reservation.tokens]
        done = await self._run(lambda: self._settle_script(keys=self.keys[1:], args=args))
        if int(done):
            self._used += actual - reservation.tokens
            reservation.tokens = actual
            reservation._handle = new_member
            self._changed.set()

    def hold(self, seconds: float) -> None:
        self._hold_until = max(self._hold_until, time.monotonic() + seconds)

    async def sync(self, view: ProviderView) -> int:
        """Hold, in Redis, what the provider counts beyond our window. Returns how many holds were added."""
        args = [
            self.rpm or 0,
            self.tpm or 0,
            self._span_ms,
            -1 if view.remaining_requests is None else view.remaining_requests,
            _reset(view.reset_requests_s, self.window_s) * 1000,
            -1 if view.remaining_tokens is None else view.remaining_tokens,
            _reset(view.reset_tokens_s, self.window_s) * 1000,
            uuid.uuid4().hex,
        ]
        added, count, used = await self._run(lambda: self._sync_script(keys=self.keys[:3], args=args))
        self._count, self._used = int(count), int(used)
        return int(added)

    def observe_headers(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None:
        view = ProviderView.from_headers(headers)
        if view.remaining_requests is None and view.remaining_tokens is None:
            return
        # Cheap local check first: only a provider that counts more than we did when it admitted
        # the call needs a round trip, which re-checks against the window as it is now.
        ours_requests, ours_tokens = _in_window(reservation, self._count, self._used)
        short_requests = self.rpm and view.remaining_requests is not None and view.remaining_requests < self.rpm - ours_requests
        short_tokens = self.tpm and view.remaining_tokens is not None and view.remaining_tokens < self.tpm - ours_tokens
        if not (short_requests or short_tokens) or (self._sync_task and not self._sync_task.done()):
            return
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_quietly(view))

    async def _sync_quietly(self, view: ProviderView) -> None:
        try:
            await self.sync(view)
        except RateLimiterUnavailable:
            pass

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._op_timeout_s * 2):
                await self._redis.ping()
        except _REDIS_ERRORS:
            return False
        self._down_until = 0.0
        return True

    async def reset(self) -> None:
        """Forget every admission (tests and benchmarks)."""
        await self._run(lambda: self._redis.delete(*self.keys))

    def usage_ratio(self) -> dict[str, float]:
        ratios: dict[str, float] = {}
        if self.rpm:
            ratios[REQUESTS] = self._count / self.rpm
        if self.tpm:
            ratios[TOKENS] = self._used / self.tpm
        return ratios

    async def aclose(self) -> None:
        if self._sync_task and not self._sync_task.done():
            self._sync_task.cancel()
        await self._redis.aclose()


class FailoverRateLimiter:
    """The shared limiter, or a local share of the limit while its store is unreachable.

    `local_share` is this replica's fair part of the global limit (1 / expected replicas), so
    replicas that all fall back together still stay under the provider's limit.
    """

    def __init__(self, shared: RedisRateLimiter, local_share: float = 1.0, *, probe_interval_s: float = 5.0) -> None:
        if not 0 < local_share <= 1:
            raise ValueError("local_share must be in (0, 1]")
        self.shared = shared
        self.local_share = local_share
        self.probe_interval_s = probe_interval_s
        self.alias = shared.alias
        self.local = LocalRateLimiter(
            _share(shared.rpm, local_share),
            _share(shared.tpm, local_share),
            window_s=shared.window_s,
            margin_s=shared.margin_s,
            alias=shared.alias,
        )
        self._fallback = False
        self._next_probe = 0.0
        self._probing = False
        metrics.ratelimit_fallback.labels(self.alias).set(0)

    @property
    def in_fallback(self) -> bool:
        return self._fallback

    def _enter_fallback(self, exc: BaseException) -> None:
        if self._fallback:
            return
        self._fallback = True
        self._next_probe = time.monotonic() + self.probe_interval_s
        metrics.ratelimit_fallback.labels(self.alias).set(1)
        log.warning(
            "shared rate limit for endpoint %s unavailable (%s); using a local share of %.0f%% until it returns",
            self.alias, exc, self.local_share * 100,
        )

    async def _probe(self) -> None:
        if self._probing:
            return
        self._probing = True
        try:
            if await self.shared.ping():
                self._fallback = False
                metrics.ratelimit_fallback.labels(self.alias).set(0)
                log.info("shared rate limit for endpoint %s is back", self.alias)
            else:
                self._next_probe = time.monotonic() + self.probe_interval_s
        finally:
            self._probing = False

    async def acquire(self, tokens: int) -> Reservation:
        if self._fallback and time.monotonic() >= self._next_probe:
            await self._probe()
        if not self._fallback:
            try:
                return await self.shared.acquire(tokens)
            except RateLimiterUnavailable as exc:
                self._enter_fallback(exc)
        return await self.local.acquire(tokens)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        if reservation.source == "shared":
            try:
                await self.shared.settle(reservation, actual_tokens)
            except RateLimiterUnavailable as exc:
                self._enter_fallback(exc)
        else:
            await self.local.settle(reservation, actual_tokens)

    def hold(self, seconds: float) -> None:
        self.shared.hold(seconds)
        self.local.hold(seconds)

    def observe_headers(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None:
        if reservation is not None and reservation.source == "shared":
            self.shared.observe_headers(headers, reservation)
        elif reservation is not None:
            self.local.observe_headers(headers, reservation)
        else:
            (self.local if self._fallback else self.shared).observe_headers(headers)

    def usage_ratio(self) -> dict[str, float]:
        return self.local.usage_ratio() if self._fallback else self.shared.usage_ratio()

    async def aclose(self) -> None:
        await self.shared.aclose()
        await self.local.aclose()


def _share(limit: int | None, share: float) -> int | None:
    if limit is None:
        return None
    return max(1, math.floor(limit * share))


def build_rate_limiter(
    alias: str,
    endpoint_cfg: Any,
    redis_url: str | None,
    replicas_hint: int = 1,
    *,
    window_s: float = DEFAULT_WINDOW_S,
    key_prefix: str = "datacreator:ratelimit",
) -> RateLimiter:
    """The limiter an endpoint needs: none, local, or shared through Redis with a local fallback."""
    rpm, tpm = endpoint_cfg.rpm, endpoint_cfg.tpm
    if rpm:
        metrics.ratelimit_limit.labels(alias, REQUESTS).set(rpm)
    if tpm:
        metrics.ratelimit_limit.labels(alias, TOKENS).set(tpm)
    if not rpm and not tpm:
        return NoopRateLimiter()
    if redis_url:
        shared = RedisRateLimiter(redis_url, f"{key_prefix}:{alias}", rpm, tpm, window_s=window_s, alias=alias)
        return FailoverRateLimiter(shared, local_share=1.0 / max(replicas_hint, 1))
    return LocalRateLimiter(rpm, tpm, window_s=window_s, alias=alias)

"""Requests-per-minute and tokens-per-minute limits, enforced before a call is sent.

- `base`: the `RateLimiter` protocol, `Reservation`, the metrics-free `Hooks`.
- `headers`: what providers say (`x-ratelimit-*`, `Retry-After`).
- `window`: the sliding-window log (pure) and `max_in_window`, the measure tests and benchmarks use.
- `local`: one process. `redis`: one limit shared by every replica. `failover`: the shared one,
  with a local share while Redis is away, and `build_rate_limiter`.
"""

from datacreator.ratelimit.base import (
    DEFAULT_WINDOW_S,
    REQUESTS,
    TOKENS,
    Hooks,
    NoopRateLimiter,
    RateLimiter,
    RateLimiterUnavailable,
    Reservation,
)
from datacreator.ratelimit.failover import FailoverRateLimiter, build_rate_limiter
from datacreator.ratelimit.headers import ProviderView, backoff_after_429, parse_duration, parse_retry_after
from datacreator.ratelimit.local import LocalRateLimiter
from datacreator.ratelimit.redis import RedisRateLimiter
from datacreator.ratelimit.window import max_in_window

__all__ = [
    "DEFAULT_WINDOW_S", "REQUESTS", "TOKENS", "FailoverRateLimiter", "Hooks", "LocalRateLimiter", "NoopRateLimiter",
    "ProviderView", "RateLimiter", "RateLimiterUnavailable", "RedisRateLimiter", "Reservation", "backoff_after_429",
    "build_rate_limiter", "max_in_window", "parse_duration", "parse_retry_after",
]

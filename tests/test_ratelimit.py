"""Rate limiters: local, shared through a real Redis, and the fallback between them."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from datacreator.config import EndpointConfig, Settings
from datacreator.llm.client import METRICS_HOOKS, LLMPool
from datacreator.ratelimit import (
    FailoverRateLimiter,
    LocalRateLimiter,
    NoopRateLimiter,
    ProviderView,
    RateLimiter,
    RateLimiterUnavailable,
    RedisRateLimiter,
    build_rate_limiter,
    max_in_window,
    parse_duration,
    parse_retry_after,
)
from tests.fixtures.redis_keys import REDIS_URL
from tests.fixtures.tcp_proxy import TcpProxy

DEAD_REDIS_URL = "redis://127.0.0.1:6390/0"


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(f"datacreator_{name}", labels)


async def admit_all(limiter: RateLimiter, n: int, tokens: int = 1) -> list[float]:
    """Acquire `n` times concurrently; the moments of admission, in order."""
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire(tokens)
        times.append(time.monotonic())

    await asyncio.gather(*(one() for _ in range(n)))
    return times


# ---------------------------------------------------------------------------------------------
# Local


async def test_local_never_admits_more_than_rpm_in_any_window_and_uses_the_quota():
    limiter = LocalRateLimiter(rpm=5, tpm=None, window_s=0.5, margin_s=0.01)
    started = time.monotonic()
    times = await admit_all(limiter, 20)
    assert len(times) == 20
    assert max_in_window(times, 0.5) <= 5
    # 20 calls at 5 per half second: the last wave is admitted right after 1.5 s.
    assert 1.5 <= times[-1] - started < 1.5 + 0.25


async def test_local_token_limit_waits_for_tokens_to_leave_the_window():
    limiter = LocalRateLimiter(rpm=None, tpm=100, window_s=0.4, margin_s=0.0)
    first = await limiter.acquire(60)
    assert first.waited_s < 0.05
    assert limiter.usage_ratio() == {"tokens": pytest.approx(0.6)}
    second = await limiter.acquire(60)
    assert second.waited_s >= 0.35
    oversize = await limiter.acquire(10_000)  # more than the whole limit: clamped, never stuck
    assert oversize.tokens == 100


async def test_settle_corrects_the_reservation_and_wakes_a_waiter():
    limiter = LocalRateLimiter(rpm=None, tpm=100, window_s=2.0)
    reservation = await limiter.acquire(90)
    waiter = asyncio.create_task(limiter.acquire(50))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    await limiter.settle(reservation, 20)
    second = await asyncio.wait_for(waiter, 0.5)  # long before the 2 s window ends
    assert second.waited_s < 0.5
    assert limiter.usage_ratio()["tokens"] == pytest.approx(0.7)
    await limiter.settle(second, 80)  # corrections go up as well
    assert limiter.usage_ratio()["tokens"] == pytest.approx(1.0)


async def test_provider_headers_showing_less_room_hold_the_difference_until_reset():
    limiter = LocalRateLimiter(rpm=10, tpm=None, window_s=5.0)
    reservation = await limiter.acquire(1)
    assert reservation.requests_in_window == 1
    # The provider has seen 8 more requests than we have (another client on the key).
    limiter.observe_headers({"x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "0.4s"}, reservation)
    assert limiter.usage_ratio()["requests"] == pytest.approx(0.9)
    await limiter.acquire(1)
    blocked = await limiter.acquire(1)
    assert 0.3 <= blocked.waited_s < 1.0  # released at the provider's reset, not after the 5 s window
    # Headers that show at least as much room change nothing.
    limiter.observe_headers({"x-ratelimit-remaining-requests": "7", "x-ratelimit-reset-requests": "1s"})
    assert limiter.usage_ratio()["requests"] == pytest.approx(0.3)


def test_header_parsing():
    assert parse_duration("1s") == 1.0
    assert parse_duration("6m0s") == 360.0
    assert parse_duration("250ms") == pytest.approx(0.25)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_duration("0.5") == 0.5
    assert parse_duration("soon") is None and parse_duration(None) is None
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    future = time.time() + 30
    from email.utils import formatdate

    assert 25 <= parse_retry_after({"retry-after": formatdate(future, usegmt=True)}) <= 31
    assert parse_retry_after({}) is None
    view = ProviderView.from_headers({"X-RateLimit-Remaining-Requests": "3", "x-ratelimit-reset-tokens": "2s", "x-ratelimit-reset-requests": "20ms"})
    assert (view.remaining_requests, view.remaining_tokens) == (3, None)
    assert view.reset_after() == 2.0


# ---------------------------------------------------------------------------------------------
# Shared through Redis


async def test_two_replicas_sharing_a_key_stay_within_the_limit(redis_prefix):
    window = 0.6
    one = RedisRateLimiter(REDIS_URL, redis_prefix, rpm=6, tpm=None, window_s=window, alias="replica-test")
    two = RedisRateLimiter(REDIS_URL, redis_prefix, rpm=6, tpm=None, window_s=window, alias="replica-test")
    try:
        started = time.monotonic()
        a, b = await asyncio.gather(admit_all(one, 12), admit_all(two, 12))
        times = a + b
        assert len(times) == 24
        assert max_in_window(times, window) <= 6
        assert 3 * window <= max(times) - started < 3 * window + 0.5  # 24 calls = 4 waves of 6
        assert one.usage_ratio()["requests"] > 0 and two.usage_ratio()["requests"] > 0
    finally:
        await one.aclose()
        await two.aclose()


async def test_redis_token_limit_and_settle(redis_prefix):
    one = RedisRateLimiter(REDIS_URL, redis_prefix, rpm=None, tpm=100, window_s=5.0)
    two = RedisRateLimiter(REDIS_URL, redis_prefix, rpm=None, tpm=100, window_s=5.0)
    try:
        reservation = await one.acquire(90)
        waiter = asyncio.create_task(two.acquire(50))
        await asyncio.sleep(0.3)
        assert not waiter.done()  # 90 + 50 > 100, shared across replicas
        await one.settle(reservation, 30)
        second = await asyncio.wait_for(waiter, 1.0)  # the other replica sees the freed tokens
        assert second.tokens_in_window == 80
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            assert int(await client.get(one.keys[2])) == 80
            members = await client.zrange(one.keys[1], 0, -1)
            assert sorted(m.decode().split("|")[1] for m in members) == ["30", "50"]
        finally:
            await client.aclose()
    finally:
        await one.aclose()
        await two.aclose()


async def test_redis_provider_deficit_is_shared(redis_prefix):
    one = RedisRateLimiter(REDIS_URL, redis_prefix, rpm=10, tpm=None, window_s=5.0)
    two = RedisRateLimiter(REDIS_URL, redis_prefix, rpm=10, tpm=None, window_s=5.0)
    try:
        await one.acquire(1)
        added = await one.sync(ProviderView(remaining_requests=2, reset_requests_s=0.5))
        assert added == 7
        await two.acquire(1)
        await two.acquire(1)
        blocked = await two.acquire(1)
        assert 0.3 <= blocked.waited_s < 1.5
    finally:
        await one.aclose()
        await two.aclose()


async def test_failover_to_a_local_share_when_redis_is_unreachable():
    shared = RedisRateLimiter(DEAD_REDIS_URL, f"test:dead:{uuid.uuid4().hex}", rpm=8, tpm=None, window_s=0.5, alias="dead-redis", op_timeout_s=0.3, hooks=METRICS_HOOKS)
    limiter = FailoverRateLimiter(shared, initial_replicas=2, probe_interval_s=60)
    try:
        with pytest.raises(RateLimiterUnavailable):
            await shared.acquire(1)
        times = await admit_all(limiter, 8)
        assert limiter.in_fallback
        assert gauge("ratelimit_local_fallback", endpoint="dead-redis") == 1.0
        assert limiter.local.rpm == 4
        assert max_in_window(times, 0.5) <= 4  # half of the global limit: this replica's share
        assert times[-1] - times[0] >= 0.5
    finally:
        await limiter.aclose()


async def test_failover_returns_to_redis_when_it_comes_back(redis_prefix):
    proxy = TcpProxy()
    await proxy.start()
    shared = RedisRateLimiter(
        f"redis://127.0.0.1:{proxy.port}/0", redis_prefix, rpm=50, tpm=None, window_s=1.0, alias="flaky-redis",
        op_timeout_s=0.3, hooks=METRICS_HOOKS,
    )
    limiter = FailoverRateLimiter(shared, initial_replicas=2, probe_interval_s=0.3)
    try:
        assert (await limiter.acquire(1)).source == "shared"
        assert gauge("ratelimit_local_fallback", endpoint="flaky-redis") == 0.0
        await proxy.stop()
        assert (await limiter.acquire(1)).source == "local"
        assert limiter.in_fallback and gauge("ratelimit_local_fallback", endpoint="flaky-redis") == 1.0
        await proxy.start()  # same port
        deadline = time.monotonic() + 5
        source = "local"
        while source != "shared" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            source = (await limiter.acquire(1)).source
        assert source == "shared"
        assert not limiter.in_fallback and gauge("ratelimit_local_fallback", endpoint="flaky-redis") == 0.0
    finally:
        await limiter.aclose()
        await proxy.stop()


async def test_build_rate_limiter_picks_the_kind():
    assert isinstance(build_rate_limiter("nolimit", EndpointConfig(base_url="http://x/v1"), REDIS_URL), NoopRateLimiter)
    noop = NoopRateLimiter()
    assert (await noop.acquire(5)).tokens == 5 and noop.usage_ratio() == {}
    local = build_rate_limiter("local-ep", EndpointConfig(base_url="http://x/v1", rpm=100, tpm=5000), None)
    assert isinstance(local, LocalRateLimiter) and (local.rpm, local.tpm) == (100, 5000)
    pool = LLMPool(Settings(endpoints_json='{"local-ep": {"base_url": "http://x/v1", "rpm": 100, "tpm": 5000}}'), redis_url="")
    try:
        assert isinstance(pool.get("local-ep").limiter, LocalRateLimiter)
        assert gauge("ratelimit_limit_per_minute", endpoint="local-ep", kind="requests") == 100
    finally:
        await pool.aclose()
    shared = build_rate_limiter("shared-ep", EndpointConfig(base_url="http://x/v1", rpm=90), REDIS_URL, replicas_hint=3)
    try:
        assert isinstance(shared, FailoverRateLimiter)
        assert shared.local.rpm == 30
        assert isinstance(shared, RateLimiter)
    finally:
        await shared.aclose()

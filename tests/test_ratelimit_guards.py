"""The limiter under provider back-off and Redis trouble, on a real Redis (127.0.0.1:6379).

Each test uses its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from datacreator.config import EndpointConfig
from datacreator.contracts import GenerationTask, ModelSpec
from datacreator.llm.client import LLMClient
from datacreator.logic.retry import RetryPolicy
from datacreator.ratelimit import FailoverRateLimiter, LocalRateLimiter, RedisRateLimiter, max_in_window
from tests.fixtures.redis_keys import REDIS_URL
from tests.fixtures.tcp_proxy import TcpProxy
from tests.helpers import make_task

DEAD_REDIS_URL = "redis://127.0.0.1:6390/0"


def task() -> GenerationTask:
    return make_task(uuid.uuid4().hex, request_id="guards", target=10, seed={"q": "Why?", "a": "B"},
                     instruction="Write short questions.", num_examples=1, example_schema={"type": "object"},
                     label_field="a", label_space=["A", "B"], model=ModelSpec(max_tokens=64))


# ---------------------------------------------------------------------------------------------
# A 429's back-off pauses the whole endpoint


async def test_a_hold_set_by_one_replica_pauses_the_other(redis_prefix):
    one = RedisRateLimiter(REDIS_URL, redis_prefix, rpm=100, tpm=None, window_s=5.0)
    two = RedisRateLimiter(REDIS_URL, redis_prefix, rpm=100, tpm=None, window_s=5.0)
    try:
        assert (await two.acquire(1)).waited_s < 0.2
        await one.hold(0.6)
        waited = (await two.acquire(1)).waited_s
        assert 0.45 <= waited < 1.5
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_hold_survives_redis_going_away():
    shared = RedisRateLimiter(DEAD_REDIS_URL, f"test:dead:{uuid.uuid4().hex}", rpm=100, tpm=None, window_s=5.0, op_timeout_s=0.2)
    limiter = FailoverRateLimiter(shared, initial_replicas=1, probe_interval_s=60)
    try:
        await limiter.hold(0.5)
        started = time.monotonic()
        reservation = await limiter.acquire(1)
        assert reservation.source == "local"
        assert time.monotonic() - started >= 0.45
    finally:
        await limiter.aclose()


async def test_a_429_pauses_every_replica_of_the_endpoint(redis_prefix, make_simulator):
    # The provider allows 2 calls per 2 s; only a token limit is configured here, so the
    # provider's x-ratelimit-*-requests headers mean nothing to us and only its 429 tells us.
    sim = make_simulator(rpm=2, rate_window_s=2.0)
    cfg = EndpointConfig(base_url=sim.base_url, model="sim", structured_output="json_object", total_timeout_s=20)
    policy = RetryPolicy(max_attempts=4, base_s=0.05, cap_s=0.2)
    replicas = [
        LLMClient(f"hold-{i}-{uuid.uuid4().hex[:6]}", cfg, RedisRateLimiter(REDIS_URL, redis_prefix, None, 1_000_000, window_s=2.0), policy)
        for i in range(2)
    ]
    try:
        assert all(r.ok for r in await asyncio.gather(replicas[0].complete(task()), replicas[0].complete(task())))
        refused = asyncio.create_task(replicas[0].complete(task()))
        deadline = time.monotonic() + 5
        while sim.stats.status(429) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert sim.stats.status(429) == 1
        await asyncio.sleep(0.05)  # the hold is written right after the 429 is read
        other = await replicas[1].complete(task())  # the other replica, after the refusal
        assert other.ok and (await refused).ok
        assert sim.stats.status(429) == 1  # the other replica waited instead of being refused too
    finally:
        for client in replicas:
            await client.aclose()


async def test_a_local_hold_delays_acquire():
    limiter = LocalRateLimiter(rpm=100, tpm=None, window_s=5.0)
    await limiter.hold(0.3)
    assert (await limiter.acquire(1)).waited_s >= 0.25


# ---------------------------------------------------------------------------------------------
# Failover: live membership, conservative seed, consecutive failures, carry-back
#
# Redis fails for real through tests.fixtures.tcp_proxy.TcpProxy, a fault-injecting TCP proxy
# between the limiter and the shared server: cut() refuses connections, `paused` stalls answers.


async def replica(proxy: TcpProxy, prefix: str, rpm: int | None, tpm: int | None, window_s: float, **kw) -> FailoverRateLimiter:
    shared = RedisRateLimiter(proxy.url, prefix, rpm, tpm, window_s=window_s, op_timeout_s=0.2, member_ttl_s=kw.pop("member_ttl_s", 15.0))
    return FailoverRateLimiter(shared, probe_interval_s=kw.pop("probe_interval_s", 0.5), **kw)


async def test_the_local_share_follows_live_membership(redis_prefix):
    proxy = TcpProxy()
    await proxy.start()
    others = [RedisRateLimiter(REDIS_URL, redis_prefix, 90, None, window_s=5.0, member_ttl_s=0.6) for _ in range(2)]
    limiter = await replica(proxy, redis_prefix, 90, None, 5.0, initial_replicas=1, member_ttl_s=0.6)
    try:
        for other in others:
            await other.acquire(1)
        await limiter.acquire(1)
        assert limiter.shared.members == 3
        await others[1].aclose()  # one replica goes away: its membership expires, the heartbeat keeps the rest
        await asyncio.sleep(1.0)
        await limiter.acquire(1)
        assert limiter.shared.members == 2
        await proxy.cut()
        assert (await limiter.acquire(1)).source == "local"
        assert limiter.local.rpm == 45  # half, the last count seen, not the configured hint of 1
    finally:
        await limiter.aclose()
        await others[0].aclose()
        await proxy.cut()


async def test_one_slow_answer_does_not_flip_to_the_local_share(redis_prefix):
    proxy = TcpProxy()
    await proxy.start()
    limiter = await replica(proxy, redis_prefix, 100, None, 5.0, initial_replicas=2)
    try:
        assert (await limiter.acquire(1)).source == "shared"
        proxy.paused = True
        asyncio.get_running_loop().call_later(0.25, setattr, proxy, "paused", False)
        reservation = await limiter.acquire(1)  # one timeout (0.2 s), then Redis answers again
        assert reservation.source == "shared" and not limiter.in_fallback
    finally:
        await limiter.aclose()
        await proxy.cut()


async def test_a_redis_outage_mid_run_never_lets_two_replicas_pass_the_limit(redis_prefix):
    """Two replicas saturate a shared limit; Redis is cut for two windows mid-run and comes back.

    Every window of the run, outage and recovery included, holds at most the limit of requests and
    of tokens, counted over both replicas' admissions.
    """
    window, rpm, tpm = 1.0, 20, 2000
    proxies = [TcpProxy(), TcpProxy()]
    for proxy in proxies:
        await proxy.start()
    replicas = [await replica(p, redis_prefix, rpm, tpm, window, initial_replicas=1) for p in proxies]
    admitted: list[tuple[float, int, str]] = []
    stop = time.monotonic() + 6.0

    async def worker(limiter: FailoverRateLimiter, n: int) -> None:
        while time.monotonic() < stop:
            tokens = 60 + (n * 37 + len(admitted) * 11) % 80  # 60..139, varied
            reservation = await limiter.acquire(tokens)
            admitted.append((time.monotonic(), reservation.tokens, reservation.source))
            await asyncio.sleep(0.02)

    async def outage() -> None:
        await asyncio.sleep(2.0)
        for proxy in proxies:
            await proxy.cut()
        await asyncio.sleep(2.0)
        for proxy in proxies:
            await proxy.start()

    try:
        await asyncio.gather(outage(), *(worker(r, n) for r in replicas for n in range(6)))
    finally:
        for limiter in replicas:
            await limiter.aclose()
        for proxy in proxies:
            await proxy.cut()
    times = [t for t, _, _ in admitted]
    sources = {s for _, _, s in admitted}
    assert sources == {"shared", "local"}  # the outage did happen, and Redis came back
    assert all(not r.in_fallback for r in replicas)
    assert max_in_window(times, window) <= rpm
    assert max_in_window(times, window, [k for _, k, _ in admitted]) <= tpm
    assert len(admitted) >= 0.5 * rpm * 6  # still working during and after the outage


# ---------------------------------------------------------------------------------------------
# The limits the provider announces (x-ratelimit-limit-*)


def test_a_local_limiter_takes_a_lower_announced_limit_and_never_a_higher_one():
    limiter = LocalRateLimiter(rpm=10, tpm=1000, window_s=5.0)
    limiter.observe_headers({"x-ratelimit-limit-requests": "4", "x-ratelimit-limit-tokens": "300"})
    assert (limiter.rpm, limiter.tpm) == (4, 300)
    limiter.observe_headers({"x-ratelimit-remaining-requests": "3"})  # no limit named: kept
    assert (limiter.rpm, limiter.tpm) == (4, 300)
    limiter.observe_headers({"x-ratelimit-limit-requests": "50", "x-ratelimit-limit-tokens": "600"})
    assert (limiter.rpm, limiter.tpm) == (10, 600)  # back up, but never past the configured limit


async def test_an_announced_lower_limit_holds_for_every_replica(redis_prefix, make_simulator):
    # Configured for 10 calls per 2 s; the provider allows 4 and says so in its headers. Before,
    # both replicas kept sending at 10 and the provider refused the rest.
    window = 2.0
    sim = make_simulator(rpm=4, rate_window_s=window)
    cfg = EndpointConfig(base_url=sim.base_url, model="sim", structured_output="json_object", total_timeout_s=30)
    policy = RetryPolicy(max_attempts=6, base_s=0.05, cap_s=0.5)
    limiters = [RedisRateLimiter(REDIS_URL, redis_prefix, 10, None, window_s=window) for _ in range(2)]
    replicas = [LLMClient(f"announced-{i}-{uuid.uuid4().hex[:6]}", cfg, limiter, policy) for i, limiter in enumerate(limiters)]
    try:
        assert (await replicas[0].complete(task())).ok
        assert limiters[0].rpm == 4
        assert limiters[0]._announce_task is not None
        await limiters[0]._announce_task  # written to Redis right after the answer is read
        await limiters[1].acquire(1)  # the other replica, before any answer of its own
        assert limiters[1].rpm == 4
        results = await asyncio.gather(*(replica.complete(task()) for replica in replicas for _ in range(3)))
        assert all(r.ok for r in results)
        assert sim.stats.status(429) == 0
        assert sim.stats.max_admitted_in_window(window) <= 4
    finally:
        for client in replicas:
            await client.aclose()


async def test_an_announced_higher_limit_is_not_taken(redis_prefix):
    one = RedisRateLimiter(REDIS_URL, redis_prefix, rpm=4, tpm=100, window_s=5.0)
    two = RedisRateLimiter(REDIS_URL, redis_prefix, rpm=4, tpm=100, window_s=5.0)
    try:
        await one.acquire(1)
        one.observe_headers({"x-ratelimit-limit-requests": "2", "x-ratelimit-limit-tokens": "1000"})
        assert one._announce_task is not None
        await one._announce_task
        await two.acquire(1)
        assert (two.rpm, two.tpm) == (2, 100)
        one.observe_headers({"x-ratelimit-limit-requests": "400", "x-ratelimit-limit-tokens": "1000"})
        await one._announce_task
        await two.acquire(1)
        assert (one.rpm, one.tpm) == (two.rpm, two.tpm) == (4, 100)
    finally:
        await one.aclose()
        await two.aclose()

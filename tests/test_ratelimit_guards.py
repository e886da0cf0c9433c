"""The limiter under provider back-off and Redis trouble, on a real Redis (127.0.0.1:6379).

Each test uses its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from datacreator.config import EndpointConfig
from datacreator.contracts import GenerationTask, ModelSpec, Reference
from datacreator.llm.client import LLMClient
from datacreator.logic.retry import RetryPolicy
from datacreator.ratelimit import FailoverRateLimiter, LocalRateLimiter, RedisRateLimiter

REDIS_URL = "redis://127.0.0.1:6379/0"
DEAD_REDIS_URL = "redis://127.0.0.1:6390/0"


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    prefix = f"test:ratelimit-guards:{uuid.uuid4().hex}"
    yield prefix
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{{{prefix}}}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def task() -> GenerationTask:
    return GenerationTask(
        task_id=uuid.uuid4().hex, request_id="guards", chain=0, step=0, strategy="random",
        instruction="Write short questions.", references=[Reference(data={"q": "Why?", "a": "B"})],
        num_examples=1, target_count=10, example_schema={"type": "object"}, label_field="a", label_space=["A", "B"],
        model=ModelSpec(max_tokens=64),
    )


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
    limiter = FailoverRateLimiter(shared, local_share=1.0, probe_interval_s=60)
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

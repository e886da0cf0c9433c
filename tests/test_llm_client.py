"""The LLM client against real HTTP servers: the simulator, and a scripted server for exact faults."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import uvicorn
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from datacreator.config import EndpointConfig, Settings
from datacreator.contracts import GenerationTask, ModelSpec
from datacreator.llm.client import CallResult, LLMClient, LLMPool, circuit_gauge
from datacreator.logic.retry import CircuitBreaker, CircuitState, RetryPolicy
from datacreator.ratelimit import LocalRateLimiter, NoopRateLimiter, RedisRateLimiter
from datacreator.simulator import SimulatorServer
from datacreator.simulator.server import bind_socket, uvicorn_config
from tests import helpers

SECRET = "sk-test-9f8e7d6c5b4a39281706"
REDIS_URL = "redis://127.0.0.1:6379/0"
EXAMPLE = {"text": "The service was quick and friendly.", "label": "positive"}
SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "label": {"type": "string", "enum": ["positive", "negative"]}},
    "required": ["text", "label"],
    "additionalProperties": False,
}


def make_task(n: int = 3, max_tokens: int = 256) -> GenerationTask:
    return helpers.make_task(uuid.uuid4().hex, request_id="req-client", seed=EXAMPLE, num_examples=n,
                             instruction="Write short restaurant reviews with their sentiment.", example_schema=SCHEMA,
                             label_field="label", label_space=["positive", "negative"], model=ModelSpec(max_tokens=max_tokens))


def endpoint(base_url: str, **overrides: Any) -> EndpointConfig:
    values: dict[str, Any] = {"base_url": base_url, "model": "sim-model", "connect_timeout_s": 2.0, "read_timeout_s": 5.0, "total_timeout_s": 20.0}
    values.update(overrides)
    return EndpointConfig(**values)


def alias() -> str:
    return f"ep-{uuid.uuid4().hex[:8]}"


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"datacreator_{name}", labels) or 0.0


def fast_policy(max_attempts: int = 4) -> RetryPolicy:
    return RetryPolicy(max_attempts=max_attempts, base_s=0.05, cap_s=0.2)


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class ScriptedServer:
    """Answers /v1/chat/completions from a script of (status, body, headers), then 200s; records requests."""

    def __init__(self) -> None:
        self.script: list[tuple[int, Any, dict[str, str]]] = []
        self.requests: list[dict[str, Any]] = []
        self.default: Callable[[dict[str, Any]], tuple[int, Any, dict[str, str]]] = self.ok
        app = Starlette(routes=[Route("/v1/chat/completions", self._handle, methods=["POST"])])
        self._socket = bind_socket("127.0.0.1", 0)
        self.port = self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @staticmethod
    def ok(body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 200, {"choices": [{"message": {"role": "assistant", "content": '{"examples": []}'}}], "usage": {"prompt_tokens": 11, "completion_tokens": 4}}, {}

    async def _handle(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.requests.append({"headers": dict(request.headers), "body": body})
        status, payload, headers = self.script.pop(0) if self.script else self.default(body)
        content = payload if isinstance(payload, (str, bytes)) else orjson.dumps(payload)
        return Response(content, status_code=status, headers=headers, media_type="application/json")

    def start(self) -> ScriptedServer:
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
        self._socket.close()


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer().start()
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------
# Retry policy and circuit breaker


def test_retry_delays_honour_retry_after_and_back_off_with_full_jitter():
    policy = RetryPolicy(max_attempts=5, base_s=0.5, cap_s=4.0)
    assert policy.delay(1, retry_after=7.0) == 7.0
    assert policy.delay(3, retry_after=0.0) == 0.0
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.7 and min(delays) < ceiling * 0.3  # spread over the range
    assert RetryPolicy(base_s=0.5, cap_s=4.0, jitter="none").delay(3) == 2.0


def test_circuit_breaker_opens_half_opens_and_closes():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=10.0, alias="breaker-unit", clock=lambda: now[0],
                             on_state=circuit_gauge("breaker-unit"))
    assert breaker.state is CircuitState.closed and breaker.allow()
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # not in a row any more
    for _ in range(3):
        breaker.record_failure()
    assert breaker.state is CircuitState.open and not breaker.allow()
    assert counter("circuit_open", endpoint="breaker-unit") == 1.0
    now[0] = 10.0
    assert breaker.state is CircuitState.half_open
    assert breaker.allow()  # the one probe
    assert not breaker.allow()
    breaker.record_failure()  # the probe failed: open again, for another 10 s
    assert breaker.state is CircuitState.open and breaker.retry_in() == pytest.approx(10.0)
    now[0] = 20.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CircuitState.closed and breaker.allow()
    assert counter("circuit_open", endpoint="breaker-unit") == 0.0


# ---------------------------------------------------------------------------------------------
# Against the simulator


async def test_ok_call_returns_text_usage_and_cost(make_simulator):
    sim: SimulatorServer = make_simulator()
    name = alias()
    cfg = endpoint(sim.base_url, input_price_per_1m=0.5, output_price_per_1m=1.5)
    async with LLMClient(name, cfg, NoopRateLimiter()) as client:
        result = await client.complete(make_task(n=4))
    assert client.is_closed
    assert isinstance(result, CallResult)
    assert result.ok and result.outcome == "ok" and result.error is None and result.attempts == 1
    assert len(orjson.loads(result.text)["examples"]) == 4
    assert result.usage.prompt_tokens == sim.stats.prompt_tokens > 0
    assert result.usage.completion_tokens == sim.stats.completion_tokens > 0
    expected = (result.usage.prompt_tokens * 0.5 + result.usage.completion_tokens * 1.5) / 1e6
    assert result.cost_usd == pytest.approx(expected)
    assert result.model == "sim-model"
    assert counter("llm_calls_total", endpoint=name, outcome="ok") == 1
    assert counter("llm_tokens_total", endpoint=name, kind="completion") == result.usage.completion_tokens
    assert counter("llm_cost_usd_total", endpoint=name) == pytest.approx(expected)


async def test_calls_queued_for_a_slot_keep_their_whole_deadline_for_the_endpoint(make_simulator):
    """One call in flight (as for the embedded server) and four calls at once: the fourth waits ~3 s
    for a slot, longer than its 2.5 s deadline; the deadline counts the endpoint's time only."""
    sim: SimulatorServer = make_simulator(latency_s=1.0)
    cfg = endpoint(sim.base_url, max_concurrency=1, total_timeout_s=2.5, read_timeout_s=2.0)
    async with LLMClient(alias(), cfg, NoopRateLimiter()) as client:
        results = await asyncio.gather(*(client.complete(make_task(n=2)) for _ in range(4)))
    assert [r.outcome for r in results] == ["ok"] * 4, [r.error for r in results]
    assert all(r.attempts == 1 for r in results)
    assert sim.stats.requests == 4


async def test_429_waits_for_retry_after(make_simulator):
    sim = make_simulator(rpm=1, rate_window_s=1.0)
    name = alias()
    client = LLMClient(name, endpoint(sim.base_url), NoopRateLimiter(), fast_policy())  # nothing paces: the provider refuses
    try:
        first = await client.complete(make_task())
        started = time.monotonic()
        second = await client.complete(make_task())
        elapsed = time.monotonic() - started
    finally:
        await client.aclose()
    assert first.ok and second.ok
    assert second.attempts == 2 and (first.throttled, second.throttled) == (0, 1)
    assert elapsed >= 1.0  # Retry-After: 1, although the policy's own backoff is at most 0.2 s
    assert sim.stats.status(429) == 1
    assert counter("llm_calls_total", endpoint=name, outcome="429") == 1


async def test_5xx_is_retried_until_success(make_simulator):
    sim = make_simulator(error_rate=1.0)
    client = LLMClient(alias(), endpoint(sim.base_url), NoopRateLimiter(), RetryPolicy(max_attempts=6, base_s=0.3, jitter="none"))
    try:
        call = asyncio.create_task(client.complete(make_task()))
        await wait_until(lambda: sim.stats.status(500) + sim.stats.status(503) >= 2)
        sim.configure(error_rate=0.0)
        result = await call
    finally:
        await client.aclose()
    assert result.ok
    assert result.attempts == sim.stats.requests >= 3
    assert result.attempts == sim.stats.status(500) + sim.stats.status(503) + 1


async def test_timeout_is_retried(make_simulator):
    sim = make_simulator(timeout_rate=1.0, timeout_hold_s=3.0)
    name = alias()
    client = LLMClient(name, endpoint(sim.base_url, read_timeout_s=0.3), NoopRateLimiter(), fast_policy())
    try:
        call = asyncio.create_task(client.complete(make_task()))
        await wait_until(lambda: sim.stats.timeouts_held >= 1)
        sim.configure(timeout_rate=0.0)
        result = await call
    finally:
        await client.aclose()
    assert result.ok and result.attempts >= 2
    assert counter("llm_calls_total", endpoint=name, outcome="timeout") == result.attempts - 1


async def test_exhausted_attempts_give_an_error_result(make_simulator):
    sim = make_simulator(error_rate=1.0)
    name = alias()
    client = LLMClient(name, endpoint(sim.base_url), NoopRateLimiter(), fast_policy(max_attempts=3), CircuitBreaker(failure_threshold=50, alias=name))
    try:
        result = await client.complete(make_task())
    finally:
        await client.aclose()
    assert not result.ok and result.outcome == "5xx"
    assert result.attempts == 3 == sim.stats.requests
    assert result.text is None and result.cost_usd == 0.0
    assert "HTTP 50" in result.error and "3 attempt" in result.error
    assert counter("llm_tasks_failed_total", endpoint=name) == 1


@pytest.mark.slow
async def test_circuit_opens_after_repeated_5xx_and_recovers(make_simulator):
    sim = make_simulator(error_rate=1.0)
    name = alias()
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=3.0, alias=name)  # longer than a 503's Retry-After
    client = LLMClient(name, endpoint(sim.base_url), NoopRateLimiter(), fast_policy(max_attempts=6), breaker)
    try:
        first = await client.complete(make_task())
        assert first.outcome == "circuit_open" and first.attempts == 3
        assert breaker.state is CircuitState.open
        assert counter("circuit_open", endpoint=name) == 1.0
        sent = sim.stats.requests
        blocked = await client.complete(make_task())
        assert blocked.outcome == "circuit_open" and blocked.attempts == 0
        assert sim.stats.requests == sent  # nothing reached the endpoint
        sim.configure(error_rate=0.0)
        await asyncio.sleep(breaker.retry_in() + 0.05)
        recovered = await client.complete(make_task())
        assert recovered.ok and breaker.state is CircuitState.closed
        assert counter("circuit_open", endpoint=name) == 0.0
    finally:
        await client.aclose()


async def test_api_key_is_sent_and_never_leaks(make_simulator, scripted, caplog):
    caplog.set_level(logging.DEBUG)
    sim = make_simulator(api_key=SECRET)
    good = LLMClient(alias(), endpoint(sim.base_url, api_key=SECRET), NoopRateLimiter())
    wrong_key = "sk-wrong-0123456789abcdef"
    bad = LLMClient(alias(), endpoint(sim.base_url, api_key=wrong_key), NoopRateLimiter())
    # A provider that echoes the key it was given in its error, in full and shortened.
    scripted.script = [(500, {"error": {"message": f"Bad key {SECRET} (sk-tes***1706) for Bearer {SECRET}"}}, {})] * 3
    echo = LLMClient(alias(), endpoint(scripted.base_url, api_key=SECRET), NoopRateLimiter(), fast_policy(max_attempts=3))
    try:
        assert (await good.complete(make_task())).ok
        refused = await bad.complete(make_task())
        echoed = await echo.complete(make_task())
    finally:
        for client in (good, bad, echo):
            await client.aclose()
    assert refused.outcome == "client_error" and refused.attempts == 1 and "401" in refused.error
    assert echoed.outcome == "5xx" and "Bad key" in echoed.error
    assert scripted.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"
    for text in (refused.error, echoed.error, caplog.text, repr(good.cfg)):
        assert SECRET not in text and wrong_key not in text
        assert "9f8e7d6c5b4a" not in text and "1706)" not in text


async def test_local_limiter_keeps_the_simulator_free_of_429(make_simulator):
    window = 2.0  # see the two-replica test below: transit time under load is part of a short window
    sim = make_simulator(rpm=5, rate_window_s=window)
    client = LLMClient(alias(), endpoint(sim.base_url, max_concurrency=8), LocalRateLimiter(5, None, window_s=window))
    try:
        results = await asyncio.gather(*(client.complete(make_task()) for _ in range(15)))
    finally:
        await client.aclose()
    assert all(r.ok for r in results)
    assert sim.stats.status(429) == 0
    assert sim.stats.max_admitted_in_window(window) <= 5
    assert sim.stats.admitted_count == 15


async def test_two_replicas_share_one_limit_through_redis(make_simulator):
    # A 2 s window: admission (in the client) and arrival (at the simulator) are apart by the
    # request's transit, which on a loaded 2-core machine reached a large share of a 1 s window.
    window = 2.0
    sim = make_simulator(rpm=6, tpm=4000, rate_window_s=window)
    prefix = f"test:client:{uuid.uuid4().hex}"
    limiters = [RedisRateLimiter(REDIS_URL, prefix, 6, 4000, window_s=window) for _ in range(2)]
    clients = [LLMClient(alias(), endpoint(sim.base_url), limiter) for limiter in limiters]
    try:
        results = await asyncio.gather(*(clients[i % 2].complete(make_task(max_tokens=200)) for i in range(16)))
    finally:
        await limiters[0].reset()
        for client in clients:
            await client.aclose()
    assert all(r.ok for r in results)
    assert sim.stats.status(429) == 0
    assert sim.stats.max_admitted_in_window(window) <= 6
    assert sim.stats.max_tokens_in_window(window) <= 4000


# ---------------------------------------------------------------------------------------------
# Against a scripted server


async def test_response_format_falls_back_when_refused(scripted):
    def refuse_schema(body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if body.get("response_format", {}).get("type") == "json_schema":
            return 400, {"error": {"message": "response_format json_schema is not supported by this model"}}, {}
        return ScriptedServer.ok(body)

    scripted.default = refuse_schema
    client = LLMClient(alias(), endpoint(scripted.base_url), NoopRateLimiter())
    try:
        first = await client.complete(make_task())
        second = await client.complete(make_task())
    finally:
        await client.aclose()
    assert first.ok and first.attempts == 1 and second.ok
    assert client.mode == "json_object"
    formats = [r["body"].get("response_format", {}).get("type") for r in scripted.requests]
    assert formats == ["json_schema", "json_object", "json_object"]
    body = scripted.requests[-1]["body"]
    assert body["model"] == "sim-model" and body["max_tokens"] == 256 and body["temperature"] == 1.0
    assert body["messages"][0]["role"] == "system"


async def test_missing_usage_is_estimated_and_bad_bodies_are_malformed(scripted):
    scripted.script = [
        (200, "not json at all", {}),
        (200, {"choices": [{"message": {"role": "assistant", "content": "x" * 400}}]}, {}),
    ]
    client = LLMClient(alias(), endpoint(scripted.base_url), NoopRateLimiter(), fast_policy())
    try:
        result = await client.complete(make_task())
    finally:
        await client.aclose()
    assert result.ok and result.attempts == 2
    assert result.usage.completion_tokens == 100 and result.usage.prompt_tokens > 50


async def test_non_retryable_client_error_stops_at_once(scripted):
    scripted.script = [(404, {"error": {"message": "model not found"}}, {})]
    client = LLMClient(alias(), endpoint(scripted.base_url), NoopRateLimiter(), fast_policy())
    try:
        result = await client.complete(make_task())
    finally:
        await client.aclose()
    assert result.outcome == "client_error" and result.attempts == 1 and "model not found" in result.error
    assert len(scripted.requests) == 1


async def test_connection_refused_is_retried_then_reported():
    client = LLMClient(alias(), endpoint("http://127.0.0.1:9/v1", connect_timeout_s=0.5), NoopRateLimiter(), fast_policy(max_attempts=2))
    try:
        result = await client.complete(make_task())
    finally:
        await client.aclose()
    assert result.outcome == "connection" and result.attempts == 2


async def test_pool_builds_one_client_per_alias(make_simulator):
    sim = make_simulator()
    settings = Settings(endpoints_json=orjson.dumps({"fast": {"base_url": sim.base_url, "rpm": 600}, "free": {"base_url": sim.base_url}}).decode())
    async with LLMPool(settings, redis_url="") as pool:
        client = pool.get("fast")
        assert pool.get("fast") is client
        assert isinstance(client.limiter, LocalRateLimiter) and isinstance(pool.get("free").limiter, NoopRateLimiter)
        assert (await client.complete(make_task())).ok
        with pytest.raises(KeyError, match="unknown LLM endpoint alias 'nope'.*fast"):
            pool.get("nope")
    assert pool._clients == {}  # closed on leaving the block


async def test_calls_spread_over_every_server_of_an_endpoint_fewest_in_flight_first(make_simulator):
    slow, fast = make_simulator(latency_s=0.6), make_simulator(latency_s=0.0)
    cfg = endpoint(slow.base_url, base_urls=[fast.base_url, slow.base_url], max_concurrency=2)
    assert cfg.servers == [slow.base_url, fast.base_url]  # each server once
    async with LLMClient(alias(), cfg, NoopRateLimiter()) as client:
        # Two at once: one to each server. Then, while the slow one is busy, the rest go to the other.
        results = await asyncio.gather(*(client.complete(make_task(n=2)) for _ in range(6)))
    assert all(r.ok for r in results)
    assert client.is_closed
    assert slow.stats.requests >= 1 and fast.stats.requests >= 1
    assert slow.stats.requests + fast.stats.requests == 6
    assert fast.stats.requests > slow.stats.requests  # the idle server took what the busy one could not


async def test_calls_in_flight_spread_over_pools_of_a_few_connections_each(make_simulator):
    """32 calls at once take 32 connections in 4 pools of at most POOL_CONNECTIONS: httpcore's pool
    walks all of its connections on each request and response (llm/client.py)."""
    from datacreator.llm.client import POOL_CONNECTIONS

    sim = make_simulator(latency_s=0.5)
    cfg = endpoint(sim.base_url, max_concurrency=32)
    async with LLMClient(alias(), cfg, NoopRateLimiter()) as client:
        (pools,) = client._servers
        calls = [asyncio.create_task(client.complete(make_task(n=1))) for _ in range(32)]
        open_connections: list[int] = []

        def count() -> bool:
            open_connections[:] = [len(pool._transport._pool.connections) for pool in pools]
            return sum(open_connections) == 32

        await wait_until(count, timeout_s=10)
        results = await asyncio.gather(*calls)
    assert all(r.ok for r in results), [r.error for r in results]
    assert len(pools) == 4 and open_connections == [POOL_CONNECTIONS] * 4
    assert sim.stats.requests == 32


async def test_a_server_that_cannot_be_reached_is_tried_after_the_others(make_simulator):
    up = make_simulator()
    down = "http://127.0.0.1:1/v1"  # nothing listens there: connection refused
    cfg = endpoint(down, base_urls=[up.base_url], max_concurrency=1, max_attempts=3)
    async with LLMClient(alias(), cfg, NoopRateLimiter(), RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.02)) as client:
        results = [await client.complete(make_task(n=1)) for _ in range(4)]
    assert all(r.ok for r in results), [r.error for r in results]
    # The refused server was tried once; every call after went to the one that answers.
    assert sum(r.attempts for r in results) == 5 and up.stats.requests == 4

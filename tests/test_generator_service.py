"""Acceptance of the generator service on real parts: the broker, Redis at 127.0.0.1:6379 and the
LLM simulator over HTTP.

- One generator, then two replicas in one consumer group sharing the limit through Redis, never
  let more than the endpoint's RPM into any window of the provider, and answer every task.
- Under a 429 storm, 5xx answers and timeouts every task ends as a candidate, or (past its
  attempts) in the DLQ with its reason: nothing vanishes.
- The token and cost totals of a request's final status equal the simulator's own usage count,
  priced by the endpoint's prices.

The rate-limit window is shortened (provider and limiter alike) to keep the tests short.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
import pytest
import redis

from datacreator import remote
from datacreator.bus.codec import decode
from datacreator.bus.readback import read_to_end
from datacreator.bus.runtime import ServiceRunner, make_producer
from datacreator.config import Settings
from datacreator.contracts import Candidate, CreationRequest, DeadLetter, GenerationTask, ModelSpec, RequestState, Strategy
from datacreator.handlers.generator import GeneratorHandler
from datacreator.serve import ServiceGroup
from tests.helpers import make_task
from tests.test_poison import FAST_GROUPS

pytestmark = pytest.mark.slow

REDIS_URL = "redis://127.0.0.1:6379/0"
WINDOW_S = 4.0
SEED = {"text": "The train was on time and the seats were clean.", "label": "positive"}


@pytest.fixture(scope="module", autouse=True)
def _redis_up() -> None:
    redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()


def _settings(bus_settings: Settings, alias: str, endpoint: dict[str, Any], **changes: Any) -> Settings:
    # A fresh alias per test is a fresh Redis key: tests never share a rate-limit window.
    return bus_settings.with_updates(
        endpoints_json=orjson.dumps({alias: endpoint}).decode(), redis_url=REDIS_URL,
        ratelimit_window_s=WINDOW_S, **FAST_GROUPS, **changes,
    )


def _tasks(alias: str, count: int) -> list[GenerationTask]:
    run = uuid.uuid4().hex[:6]
    return [
        make_task(f"{run}-task-{i}", request_id=f"{run}-req-{i % 6}", target=2 * count, seed=SEED, chain=i,
                  strategy=Strategy.none, instruction="Write short train reviews labelled positive or negative.",
                  num_examples=2, example_schema={"type": "object"}, label_field=None, label_space=None,
                  model=ModelSpec(endpoint=alias, max_tokens=256))
        for i in range(count)
    ]


class Generators:
    """`replicas` generator services in one consumer group, each with its own LLM pool."""

    def __init__(self, settings: Settings, replicas: int) -> None:
        group_id = f"generator-{uuid.uuid4().hex[:8]}"
        self.runners = [ServiceRunner(settings, GeneratorHandler(settings), group_id=group_id) for _ in range(replicas)]
        self.partitions = settings.kafka.topic_partitions
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Generators:
        self._tasks = [asyncio.create_task(r.run()) for r in self.runners]
        deadline = time.monotonic() + 40
        # Ready once the group has settled: every member holds partitions and together all of them.
        while not (all(r.state.ready and r.state.assigned for r in self.runners)
                   and sum(len(r.state.assigned) for r in self.runners) == self.partitions):
            for task in self._tasks:
                if task.done():
                    task.result()
            assert time.monotonic() < deadline, "generators did not join"
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for runner in self.runners:
            runner.request_stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _publish(settings: Settings, tasks: list[GenerationTask]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        futures = [await producer.send(settings.topics.tasks, t.model_dump_json().encode(), key=t.request_id.encode()) for t in tasks]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _answers(settings: Settings, task_ids: set[str], timeout_s: float) -> tuple[dict[str, Candidate], dict[str, DeadLetter]]:
    """Candidates and dead letters by task id, once every task has a candidate (or on timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        candidates: dict[str, Candidate] = {}
        async for record in read_to_end(settings, settings.topics.candidates):
            candidate = decode(Candidate, record.value)
            candidates[candidate.task.task_id] = candidate
        if task_ids <= candidates.keys() or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    letters: dict[str, DeadLetter] = {}
    async for record in read_to_end(settings, settings.topics.dlq):
        letter = decode(DeadLetter, record.value)
        letters[GenerationTask.model_validate_json(letter.value).task_id] = letter
    return candidates, letters


@pytest.mark.parametrize("replicas", [1, 2])
async def test_generators_sharing_redis_never_exceed_the_rpm(bus_settings, make_simulator, replicas):
    rpm = 6
    sim = make_simulator(rpm=rpm, rate_window_s=WINDOW_S)
    alias = f"gen-rpm-{uuid.uuid4().hex[:8]}"
    endpoint = {"base_url": sim.base_url, "model": "datacreator-simulator", "rpm": rpm}
    settings = _settings(bus_settings, alias, endpoint, generator_replicas=replicas)
    tasks = _tasks(alias, 15)
    async with Generators(settings, replicas):
        started = time.monotonic()
        await _publish(settings, tasks)
        candidates, letters = await _answers(settings, {t.task_id for t in tasks}, timeout_s=40)
        elapsed = time.monotonic() - started

    assert len(candidates) == len(tasks) and not letters
    assert all(c.raw_output and c.error is None for c in candidates.values())
    assert sim.stats.max_admitted_in_window(WINDOW_S) <= rpm
    assert sim.stats.admitted_count == len(tasks)
    # The pacing is ours, not the provider's: 15 calls sent at once would draw 9 refusals per
    # replica. One or two may still meet the provider's window edge when the machine is busy
    # (the limiter's margin is 0.5% of the window, at least 50 ms).
    assert sim.stats.status(429) <= 2, sim.stats.responses
    # 15 calls at 6 per window cannot take less than two full windows.
    assert elapsed >= 2 * WINDOW_S * 0.9


async def test_faults_end_every_task_as_a_candidate_or_a_dead_letter(bus_settings, make_simulator):
    sim = make_simulator(storm_429_rate=0.25, storm_retry_after_s=1, error_rate=0.2, timeout_rate=0.15, timeout_hold_s=2.0, seed=7)
    alias = f"gen-faults-{uuid.uuid4().hex[:8]}"
    endpoint = {"base_url": sim.base_url, "model": "datacreator-simulator", "max_attempts": 2,
                "read_timeout_s": 0.5, "total_timeout_s": 15}
    settings = _settings(bus_settings, alias, endpoint, generator_replicas=2)
    tasks = _tasks(alias, 40)
    async with Generators(settings, 2):
        await _publish(settings, tasks)
        candidates, letters = await _answers(settings, {t.task_id for t in tasks}, timeout_s=40)

    ok = {tid for tid, c in candidates.items() if c.error is None}
    failed = {tid for tid, c in candidates.items() if c.error is not None}
    assert ok | failed == {t.task_id for t in tasks}, "a task vanished"
    assert failed == set(letters), "every failed task, and only those, is in the DLQ"
    assert len(ok) + len(letters) == len(tasks)
    for task_id, letter in letters.items():
        assert letter.error and letter.error == candidates[task_id].error
        assert letter.error_type == "LLMCallFailed" and letter.attempts <= 2
    for task_id in ok:
        assert candidates[task_id].raw_output
    faults = sim.stats.faults
    assert faults.get("storm_429") and faults.get("timeout") and (faults.get("error_500", 0) + faults.get("error_503", 0))
    assert ok, "some calls get through the faults"


async def test_status_totals_equal_the_providers_usage(bus_settings, make_simulator):
    sim = make_simulator()
    prices = {"input_price_per_1m": 1.5, "output_price_per_1m": 6.0}
    endpoint = {"base_url": sim.base_url, "model": "datacreator-simulator", **prices}
    settings = bus_settings.with_updates(endpoints_json=orjson.dumps({"default": endpoint}).decode(), **FAST_GROUPS)
    # One chain: one call in flight, so no call is still under way when the request completes.
    request = CreationRequest(instruction="Write short train reviews labelled positive or negative.", formatting_example=SEED,
                              target_count=12, examples_per_call=4, chains=1)
    group = await ServiceGroup(settings).start()
    try:
        await remote.submit(settings, request)
        final = await remote.wait_for_final(settings, request.request_id, timeout_s=60)
    finally:
        await group.stop()
    assert final.state == RequestState.COMPLETED
    usage = sim.stats.snapshot()
    assert final.llm_calls == sim.stats.status(200) >= 3
    assert final.prompt_tokens == usage["prompt_tokens"] > 0
    assert final.completion_tokens == usage["completion_tokens"] > 0
    expected = (usage["prompt_tokens"] * prices["input_price_per_1m"] + usage["completion_tokens"] * prices["output_price_per_1m"]) / 1e6
    assert final.cost_usd == pytest.approx(expected, rel=1e-9, abs=1e-12)

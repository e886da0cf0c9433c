"""Delivery findings of issue 15, items 1, 3, 4 and 8: no outcome ahead of its examples, no
request left RUNNING by a lost outcome, no state rebuilt from a partial read, no REJECTED for a
request that was accepted.

Each test says whether it runs on the real embedded broker or drives a handler directly, and,
where Tansu cannot show a fault, how a fault-injecting wrapper reproduces what Apache Kafka does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import MessageSizeTooLargeError

from datacreator.bus import readback, runtime
from datacreator.bus.admin import ensure_topics
from datacreator.bus.codec import decode, encode
from datacreator.bus.factory import make_consumer, make_producer
from datacreator.bus.readback import read_to_end
from datacreator.bus.runtime import Delivery, Output, ServiceRunner, dead_letter
from datacreator.config import Settings
from datacreator.contracts import (
    CreationRequest,
    Example,
    GenerationTask,
    RequestState,
    RequestStatus,
    TaskOutcome,
    Usage,
)
from datacreator.embedded.broker import EmbeddedBroker
from datacreator.handlers.curator import CuratorHandler
from datacreator.handlers.generator import GeneratorHandler
from datacreator.handlers.planner import PlannerHandler
from datacreator.llm.client import CallResult
from datacreator.logic.curation import CuratorState
from datacreator.logic.planning import PlannerLimits
from tests.fixtures.broker import unique_topics
from tests.helpers import MCQ, MCQ_INSTRUCTION, candidate, item, make_task

FAST = {"kafka_session_timeout_ms": 3000, "kafka_heartbeat_interval_ms": 500, "shutdown_timeout_s": 2.0}
ENDPOINTS = '{"default": {"base_url": "http://127.0.0.1:9", "model": "m"}}'


async def _settings(broker: EmbeddedBroker, **extra: Any) -> Settings:
    # One partition: every message of the test's request, of every topic, is on partition 0.
    settings = Settings(
        kafka_bootstrap=broker.bootstrap, kafka_security_protocol="PLAINTEXT", topics=unique_topics(),
        topic_partitions=1, kafka_client_overrides=EmbeddedBroker.client_overrides(), endpoints_json=ENDPOINTS,
        **FAST, **extra,
    )
    await ensure_topics(settings)
    return settings


async def _send(settings: Settings, topic: str, messages: Iterable[Any]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for message in messages:
            request_id = message.task.request_id if hasattr(message, "task") else message.request_id
            await producer.send_and_wait(topic, encode(message), key=request_id.encode())
    finally:
        await producer.stop()


async def _read(settings: Settings, topic: str, model: type) -> list[Any]:
    return [decode(model, r.value) async for r in read_to_end(settings, topic)]


async def _committed(settings: Settings, group_id: str, tp: TopicPartition) -> int:
    consumer = make_consumer(settings, group_id=group_id)
    await consumer.start()
    try:
        return await consumer.committed(tp) or 0
    finally:
        await consumer.stop()


async def _until(check, what: str, task: asyncio.Task | None = None, timeout_s: float = 45.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if task is not None:
            assert not task.done(), task.exception()
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.2)


async def _run_until_committed(settings: Settings, runner: ServiceRunner, topic: str, upto: int) -> None:
    task = asyncio.create_task(runner.run())
    tp = TopicPartition(topic, 0)

    async def done() -> bool:
        return await _committed(settings, runner.group_id, tp) >= upto

    try:
        await _until(done, f"{topic}[0] committed to {upto}", task)
    finally:
        runner.request_stop()
        await asyncio.wait_for(task, 60)


# -- item 1: outcome before examples -----------------------------------------------------------


class UnackedExamplesProducer:
    """A producer whose sends to the examples topic are never acknowledged, while every other send
    goes through: on a multi-broker Kafka the examples' partition leader can be another broker
    than the outcomes', and fail or lag while the outcome is acknowledged. Tansu is one node and
    acknowledges in the order it receives, so it cannot show this; the wrapper holds the examples'
    futures for ever (the curator is then stopped, as a kill or a shutdown whose flush times out)."""

    def __init__(self, inner: Any, examples_topic: str) -> None:
        self.inner, self.examples_topic = inner, examples_topic
        self.sends: list[str] = []
        self.held = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None, **options: Any):
        self.sends.append(topic)
        if topic == self.examples_topic:
            self.held.set()
            return asyncio.get_running_loop().create_future()  # never acknowledged
        return await self.inner.send(topic, value, key=key, **options)


async def test_the_outcome_is_not_sent_before_its_examples_are_acknowledged(broker, monkeypatch):
    """Real broker, fault-injecting producer (see UnackedExamplesProducer). Before the fix the
    outcome went out in the same batch as its examples and was acknowledged while they were lost:
    the planner counted two examples the topic never held. Now nothing of the outcome is sent
    while the examples are unacknowledged; the redelivered candidate publishes both, then it."""
    settings = await _settings(broker)
    t = settings.topics
    answer = candidate(make_task(request_id="req-1", target=10), [item(1), item(2)])
    await _send(settings, t.candidates, [answer])
    producers: list[UnackedExamplesProducer] = []

    def unacked(s: Settings, **options: Any) -> UnackedExamplesProducer:
        producers.append(UnackedExamplesProducer(make_producer(s, **options), t.examples))
        return producers[-1]

    monkeypatch.setattr(runtime, "make_producer", unacked)
    runner = ServiceRunner(settings, CuratorHandler(settings))
    task = asyncio.create_task(runner.run())
    try:
        await _until(lambda: _true(bool(producers) and producers[0].held.is_set()), "examples sent", task)
    finally:
        runner.request_stop()
        await asyncio.wait_for(task, 60)
    assert t.outcomes not in producers[0].sends
    assert await _read(settings, t.outcomes, TaskOutcome) == []

    monkeypatch.setattr(runtime, "make_producer", make_producer)  # the curator restarted, the broker well
    await _run_until_committed(settings, ServiceRunner(settings, CuratorHandler(settings)), t.candidates, 1)
    examples = await _read(settings, t.examples, Example)
    (outcome,) = await _read(settings, t.outcomes, TaskOutcome)
    assert sorted(e.data["question"] for e in examples) == sorted([item(1)["question"], item(2)["question"]])
    assert {a.example_id for a in outcome.accepted} == {e.example_id for e in examples}


async def _true(value: bool) -> bool:
    return value


async def test_a_redelivered_candidate_of_a_completed_request_republishes_its_missing_examples(broker):
    """Real broker. The state the old code left: the request is COMPLETED (its outcome counted two
    examples) and only one of them is on the examples topic. The candidate, redelivered, used to be
    answered `request_closed`; now it is curated against the examples read back: the missing one
    is published again under its id, the one that landed is not repeated."""
    settings = await _settings(broker)
    t = settings.topics
    task = make_task("t-0", request_id="req-c", target=2)
    answer = candidate(task, [item(1), item(2)])
    landed = CuratorState().curate(answer).examples[0]  # the example that did land: same id as the curator's
    await _send(settings, t.examples, [landed])
    await _send(settings, t.status, [RequestStatus(request_id="req-c", state=RequestState.COMPLETED, target_count=2,
                                                   accepted=2, finished_at=time.time())])
    handler = CuratorHandler(settings)
    runner = ServiceRunner(settings, handler)
    task_ = asyncio.create_task(runner.run())
    try:
        # The candidate comes once the curator knows the request is closed (the order of a restart).
        await _until(lambda: _true(handler.status.is_closed("req-c") and runner.state.ready), "status seen", task_)
        await _send(settings, t.candidates, [answer])

        async def done() -> bool:
            return await _committed(settings, runner.group_id, TopicPartition(t.candidates, 0)) >= 1

        await _until(done, "candidate committed", task_)
    finally:
        runner.request_stop()
        await asyncio.wait_for(task_, 60)
    examples = await _read(settings, t.examples, Example)
    assert sorted(e.data["question"] for e in examples) == sorted([item(1)["question"], item(2)["question"]])
    (outcome,) = await _read(settings, t.outcomes, TaskOutcome)
    assert "request_closed" not in outcome.rejected and len(outcome.accepted) == 2


# -- item 3: requests stuck in RUNNING --------------------------------------------------------


async def test_a_task_whose_outcome_never_comes_is_issued_again_then_fails_the_request(broker):
    """Real broker, no generator: nothing ever answers the request's one task (as when a curator
    dead-lettered its candidate, or a generator was stopped mid-call). The request stayed RUNNING
    for ever; now the planner issues the same task id again after task_deadline_s, and after
    max_task_issues counts it as a failed call (stall_calls=1: the request FAILS)."""
    settings = await _settings(broker, stall_calls=1)
    t = settings.topics
    limits = PlannerLimits(stall_calls=1, task_deadline_s=0.5, max_task_issues=2)
    request = CreationRequest(request_id="req-s", instruction=MCQ_INSTRUCTION, formatting_example=MCQ, target_count=2,
                              examples_per_call=2, chains=1)
    await _send(settings, t.requests, [request])
    runner = ServiceRunner(settings, PlannerHandler(settings, limits=limits))
    task = asyncio.create_task(runner.run())

    async def failed() -> bool:
        statuses = await _read(settings, t.status, RequestStatus)
        return any(s.state == RequestState.FAILED for s in statuses)

    try:
        await _until(failed, "request FAILED", task)
    finally:
        runner.request_stop()
        await asyncio.wait_for(task, 60)
    tasks = await _read(settings, t.tasks, GenerationTask)
    assert len({x.task_id for x in tasks}) == 1 and len({x.created_at for x in tasks}) == 2  # one task, issued twice
    final = [s for s in await _read(settings, t.status, RequestStatus) if s.state.final][-1]
    assert final.state == RequestState.FAILED and final.failed_calls == 1 and "no outcome after 2 issues" in final.error
    (given_up,) = await _read(settings, t.outcomes, TaskOutcome)  # on the topic: the status is its fold
    assert given_up.task_id == tasks[0].task_id and given_up.attempts == 0


class SizeLimitedProducer:
    """Refuses records over `limit` bytes for one topic, as Apache Kafka does for a topic's
    max.message.bytes: the record's future fails with MESSAGE_TOO_LARGE. Tansu enforces no limit."""

    def __init__(self, inner: Any, topic: str, limit: int) -> None:
        self.inner, self.topic, self.limit = inner, topic, limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None, **options: Any):
        if topic == self.topic and value is not None and len(value) > self.limit:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(MessageSizeTooLargeError(f"{len(value)} bytes"))
            return future
        return await self.inner.send(topic, value, key=key, **options)


async def test_a_dead_lettered_candidate_still_answers_its_task_and_its_count_is_read_back(broker, monkeypatch):
    """Real broker, fault-injecting producer (see SizeLimitedProducer): the first candidate's one
    example is refused for good, so the candidate goes to the DLQ. Before, no outcome followed (the
    planner waited for it for ever) and the curator went on counting the refused example: the next
    candidate was surplus. Now a failed outcome answers the task, and the request's state is read
    back from the topic before its next candidate, which meets the target (1)."""
    settings = await _settings(broker)
    t = settings.topics
    big = {**item(1), "question": "Which of these is true? " + "x" * 3000}
    await _send(settings, t.candidates, [candidate(make_task("t-big", request_id="req-d", target=1), [big]),
                                         candidate(make_task("t-2", request_id="req-d", target=1), [item(2)])])
    monkeypatch.setattr(runtime, "make_producer", lambda s, **o: SizeLimitedProducer(make_producer(s, **o), t.examples, 2500))
    await _run_until_committed(settings, ServiceRunner(settings, CuratorHandler(settings)), t.candidates, 2)
    first, second = await _read(settings, t.outcomes, TaskOutcome)
    assert first.task_id == "t-big" and first.accepted == [] and "MessageSizeTooLarge" in (first.error or "")
    assert second.task_id == "t-2" and len(second.accepted) == 1 and second.target_reached
    assert [e.task_id for e in await _read(settings, t.examples, Example)] == ["t-2"]


class _BlockingPool:
    """An LLM endpoint whose calls wait until released (or cancelled)."""

    def __init__(self) -> None:
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    def get(self, alias: str) -> _BlockingPool:
        return self

    async def complete(self, task: GenerationTask) -> CallResult:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        return CallResult(text='{"examples": []}', usage=Usage(prompt_tokens=5, completion_tokens=3), latency_s=0.1,
                          attempts=1, outcome="ok", error=None, cost_usd=0.0, model="m")


class _Context:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def publish(self, outputs: Iterable[Output]) -> None:
        return None

    def dead_letter(self, delivery: Delivery, reason: Exception | str, *, attempts: int = 1,
                    error_type: str | None = None) -> Output:
        return dead_letter(delivery, reason, service="test", topic=self.settings.topics.dlq, attempts=attempts)


async def test_a_task_redelivered_to_the_member_calling_it_is_not_answered_empty():
    """The generator handler, no broker. A rebalance that hands a partition back to the same
    member redelivers its uncommitted task while the first call is still under way; a SIGTERM then
    cancels that call. The redelivery used to return nothing (its offset committed, the task
    lost); now it waits for the call under way and makes the call itself when that one is
    cancelled. (Tansu can run the rebalance, but not choose that the same member gets the
    partition back mid-call: the two deliveries are driven directly.)"""
    settings = Settings(endpoints_json=ENDPOINTS)
    pool = _BlockingPool()
    generator = GeneratorHandler(settings, pool=pool)  # type: ignore[arg-type]
    generator.ctx = _Context(settings)  # type: ignore[assignment]
    task = make_task()
    first = asyncio.create_task(generator.handle(task, Delivery(settings.topics.tasks, 0, 5, task.request_id)))
    await asyncio.wait_for(pool.started.wait(), 10)
    again = asyncio.create_task(generator.handle(task, Delivery(settings.topics.tasks, 0, 5, task.request_id)))
    await asyncio.sleep(0)
    assert not again.done()  # waiting for the call under way, not answered empty
    first.cancel()
    pool.release.set()
    outputs = await asyncio.wait_for(again, 10)
    assert [o.topic for o in outputs] == [settings.topics.candidates] and pool.calls == 2

    # A third delivery of the same issue is answered by that call; an issue again (new created_at) is called.
    assert await generator.handle(task, Delivery(settings.topics.tasks, 0, 5, task.request_id)) == []
    reissued = task.model_copy(update={"created_at": task.created_at + 60})
    assert [o.topic for o in await generator.handle(reissued, Delivery(settings.topics.tasks, 0, 6, task.request_id))] \
        == [settings.topics.candidates]
    assert pool.calls == 3


# -- item 4: state rebuilt from a partial read --------------------------------------------------


class StallingReader:
    """A read-back consumer that hands out nothing from `offset` on in one topic, as Tansu does after
    a restart until a partition's next write (and as a lagging replica can): the records are
    reported (end offsets) but not returned. Applies to the first `times` consumers of that topic."""

    def __init__(self, inner: Any, topic: str, offset: int) -> None:
        self.inner, self.topic, self.offset = inner, topic, offset

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def getmany(self, *partitions: TopicPartition, **options: Any) -> dict:
        batches = await self.inner.getmany(*partitions, **options)
        out = {}
        for tp, records in batches.items():
            kept = [r for r in records if tp.topic != self.topic or r.offset < self.offset]
            if len(kept) < len(records):
                self.inner.seek(tp, self.offset)
            if kept:
                out[tp] = kept
        return out


async def test_a_curator_restored_from_a_partial_read_holds_its_partition_until_the_read_is_whole(broker, monkeypatch):
    """Real broker, fault-injecting reader (see StallingReader): the first read-back of the examples
    topic stops after the first of the request's three examples. The curator used to go on with
    one example known: a new candidate took the request past its target (5 examples of 3). Now the
    take-over fails, is retried, and the candidate meets the whole state: its items are surplus."""
    settings = await _settings(broker)
    t = settings.topics
    first = candidate(make_task("t-0", request_id="req-p", target=3), [item(1), item(2), item(3)])
    await _send(settings, t.examples, CuratorState().curate(first).examples)
    await _send(settings, t.candidates, [candidate(make_task("t-1", request_id="req-p", target=3), [item(4), item(5)])])
    monkeypatch.setattr(readback, "READ_STALL_S", 1.0)
    readers = {"stalled": 0}

    def reader(s: Settings, **options: Any) -> Any:
        consumer = make_consumer(s, **options)
        if options.get("group_id") or readers["stalled"]:
            return consumer
        readers["stalled"] += 1  # the first read-back only (the curator's take-over)
        return StallingReader(consumer, t.examples, 1)

    monkeypatch.setattr(readback, "make_consumer", reader)
    handler = CuratorHandler(settings)
    handler.status.start = _no_status_watch(handler)  # type: ignore[method-assign]
    await _run_until_committed(settings, ServiceRunner(settings, handler), t.candidates, 1)
    assert readers["stalled"] == 1
    assert len(await _read(settings, t.examples, Example)) == 3
    (outcome,) = await _read(settings, t.outcomes, TaskOutcome)
    assert outcome.accepted == [] and outcome.rejected == {"surplus": 2} and outcome.target_reached


def _no_status_watch(handler: CuratorHandler):
    # The status watcher reads through the same consumer factory; this test has no statuses.
    async def start():
        return handler.status
    return start


async def test_a_failing_take_over_is_retried_and_no_record_is_handled_before_it_succeeds(broker):
    """Real broker: on_assigned raises twice (aiokafka swallowed it, and the records were handled
    anyway); now the partitions stay paused until a take-over succeeds."""
    settings = await _settings(broker)
    t = settings.topics
    log: list[str] = []

    class Flaky(PlannerHandler):
        async def on_assigned(self, partitions: set[int]) -> None:
            log.append("assign")
            if log.count("assign") <= 2:
                raise readback.IncompleteRead("the state topic stopped short")
            await super().on_assigned(partitions)

        async def handle(self, message: Any, delivery: Delivery) -> list[Output]:
            log.append("handle")
            return await super().handle(message, delivery)

    request = CreationRequest(request_id="req-f", instruction=MCQ_INSTRUCTION, formatting_example=MCQ, target_count=2)
    await _send(settings, t.requests, [request])
    await _run_until_committed(settings, ServiceRunner(settings, Flaky(settings)), t.requests, 1)
    assert log[:4] == ["assign", "assign", "assign", "handle"]


# -- item 8: REJECTED only for a request never accepted -----------------------------------------


async def test_a_running_request_is_not_rejected_by_another_message_after_a_partial_restore(broker, monkeypatch):
    """Real broker, fault-injecting reader (see StallingReader) on the planner's snapshots. Request
    `req-r` runs; the planner restarts and its first read of the snapshots stops short; then come,
    keyed by its id, the same id with an unknown endpoint (a request that would be refused), one
    that does not decode, and the request again. The planner used to go on without the plan and
    publish REJECTED for the running request (generators and curators then drop its work); now
    it holds the partition until the snapshot is read, and the status stays RUNNING."""
    settings = await _settings(broker)
    t = settings.topics
    request = CreationRequest(request_id="req-r", instruction=MCQ_INSTRUCTION, formatting_example=MCQ, target_count=4)
    await _send(settings, t.requests, [request])
    await _run_until_committed(settings, ServiceRunner(settings, PlannerHandler(settings)), t.requests, 1)

    other = {**request.model_dump(mode="json"), "model": {"endpoint": "nowhere"}}
    producer = make_producer(settings)
    await producer.start()
    try:
        for value in (orjson.dumps(other), orjson.dumps({"request_id": "req-r", "instruction": 5}), encode(request)):
            await producer.send_and_wait(t.requests, value, key=b"req-r")
    finally:
        await producer.stop()
    monkeypatch.setattr(readback, "READ_STALL_S", 1.0)
    readers = {"stalled": 0}

    def reader(s: Settings, **options: Any) -> Any:
        consumer = make_consumer(s, **options)
        if readers["stalled"]:
            return consumer
        readers["stalled"] += 1  # the restarted planner's first read of its snapshots
        return StallingReader(consumer, t.planner_state, 0)

    monkeypatch.setattr(readback, "make_consumer", reader)
    await _run_until_committed(settings, ServiceRunner(settings, PlannerHandler(settings)), t.requests, 4)
    assert readers["stalled"] == 1
    statuses = await _read(settings, t.status, RequestStatus)
    assert {s.state for s in statuses} == {RequestState.RUNNING}


def test_planner_limits_keep_old_snapshots_readable():
    """A snapshot written before task deadlines restores with the default deadline."""
    from datacreator.logic.planning import RequestPlan

    plan = RequestPlan.start(CreationRequest(request_id="r", instruction=MCQ_INSTRUCTION, formatting_example=MCQ,
                                             target_count=2), 0.0)
    plan.next_tasks(0.0)
    snapshot = plan.snapshot()
    del snapshot["limits"]["task_deadline_s"], snapshot["limits"]["max_task_issues"]
    for entry in snapshot["in_flight"].values():
        del entry["issues"]
    restored = RequestPlan.restore(snapshot)
    assert not restored.overdue(1000.0) and restored.overdue(PlannerLimits().task_deadline_s)


@pytest.mark.parametrize("late", [False, True])
def test_a_task_reissued_keeps_its_id_and_an_outcome_of_either_issue_answers_it(late: bool):
    """logic/planning.py alone: re-issue after the deadline, same id, one outcome applied."""
    from datacreator.logic.planning import RequestPlan

    limits = PlannerLimits(task_deadline_s=10, max_task_issues=3)
    plan = RequestPlan.start(CreationRequest(request_id="r", instruction=MCQ_INSTRUCTION, formatting_example=MCQ,
                                             target_count=2, examples_per_call=2, chains=1), 0.0, limits)
    (task,) = plan.next_tasks(0.0)
    assert plan.reissue_overdue(5.0) == ([], [])
    (again,), none = plan.reissue_overdue(10.0)
    assert again.task_id == task.task_id and again.created_at == 10.0 != task.created_at and none == []
    outcome = TaskOutcome(task_id=task.task_id, request_id="r", chain=0, step=0, references=task.references)
    if late:  # the third issue, then no more: a failed outcome, applied like any other
        assert len(plan.reissue_overdue(20.0)[0]) == 1
        tasks, (outcome,) = plan.reissue_overdue(30.0)
        assert tasks == [] and outcome.task_id == task.task_id and outcome.error
    plan.on_outcome(outcome, 31.0)
    plan.on_outcome(outcome, 32.0)  # the other issue's outcome: applied once
    assert plan.counts.llm_calls == (0 if late else 1) and plan.counts.failed_calls == (1 if late else 0)
    assert plan.in_flight == 0


@pytest.mark.parametrize("error", ["ReadOnlyError", "OutOfMemoryError", "ClusterDownError"])
async def test_a_redis_that_answers_with_an_error_makes_the_limiter_admit_locally(redis_prefix, error: str):
    """Real Redis, its answers replaced by the errors a replica, a full Redis or a cluster give
    (`READONLY`, `OOM`, `CLUSTERDOWN`): these are not connection errors, and once escaped
    LLMClient.complete, failing the task. Every Redis error now means "unavailable": the
    limiter falls back to its local share and the call is admitted."""
    import redis.exceptions

    from datacreator.llm.client import METRICS_HOOKS
    from datacreator.ratelimit import FailoverRateLimiter, RateLimiterUnavailable, RedisRateLimiter
    from tests.fixtures.redis_keys import REDIS_URL

    shared = RedisRateLimiter(REDIS_URL, redis_prefix, rpm=8, tpm=None, window_s=0.5, alias=f"answers-{error}",
                              op_timeout_s=0.3, hooks=METRICS_HOOKS)

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise getattr(redis.exceptions, error)(f"{error} from the server")

    shared._acquire_script = refuse  # type: ignore[assignment]
    limiter = FailoverRateLimiter(shared, initial_replicas=1, probe_interval_s=60)
    try:
        with pytest.raises(RateLimiterUnavailable):
            await shared.acquire(1)
        assert (await asyncio.wait_for(limiter.acquire(1), 10)).source == "local" and limiter.in_fallback
    finally:
        await limiter.aclose()

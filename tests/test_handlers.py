"""The services' handlers without a broker: a model and a Delivery in, outputs out.

The runner's own part (decoding, dead letters) is driven the same way, through a record that
never went near Kafka.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import orjson
import pytest

from datacreator.bus.codec import encode
from datacreator.bus.runtime import Delivery, Output, ServiceRunner, dead_letter, value_of
from datacreator.config import Settings
from datacreator.contracts import (
    Candidate,
    CreationRequest,
    DeadLetter,
    Example,
    GenerationTask,
    PlannerSnapshot,
    RequestState,
    RequestStatus,
    TaskOutcome,
    Usage,
)
from datacreator.handlers.curator import CuratorHandler
from datacreator.handlers.generator import GeneratorHandler
from datacreator.handlers.planner import PlannerHandler
from datacreator.handlers.sink import SinkHandler
from datacreator.llm.client import CallResult
from tests.helpers import MCQ, MCQ_INSTRUCTION, candidate, item, make_task

SETTINGS = Settings(endpoints_json='{"default": {"base_url": "http://127.0.0.1:9", "model": "m"}}')
TOPICS = SETTINGS.topics


class FakeContext:
    """What the runner gives a handler, minus the broker: published outputs are kept."""

    settings = SETTINGS

    def __init__(self) -> None:
        self.published: list[Output] = []

    async def publish(self, outputs: Iterable[Output]) -> None:
        self.published.extend(outputs)

    def dead_letter(self, delivery: Delivery, reason: Exception | str, *, attempts: int = 1,
                    error_type: str | None = None) -> Output:
        return dead_letter(delivery, reason, service="test", topic=TOPICS.dlq, attempts=attempts, error_type=error_type)


def delivery(topic: str, message: object, partition: int = 0, offset: int = 0) -> Delivery:
    return Delivery(topic, partition, offset, getattr(message, "request_id", None), encode(message))


def by_topic(outputs: list[Output], topic: str) -> list:
    """The messages sent to `topic` (a deferred snapshot built as the runner would send it now)."""
    return [value_of(o) for o in outputs if o.topic == topic]


async def test_planner_plans_a_request_and_follows_its_outcomes() -> None:
    planner = PlannerHandler(SETTINGS)
    planner.ctx = FakeContext()
    request = CreationRequest(instruction=MCQ_INSTRUCTION, formatting_example=MCQ, target_count=2,
                              examples_per_call=2, chains=1)
    outputs = await planner.handle(request, delivery(TOPICS.requests, request, partition=4))
    (task,) = by_topic(outputs, TOPICS.tasks)
    assert isinstance(task, GenerationTask) and task.request_id == request.request_id
    assert by_topic(outputs, TOPICS.status)[0].state == RequestState.RUNNING
    assert isinstance(by_topic(outputs, TOPICS.planner_state)[0], PlannerSnapshot)
    assert planner.partition_of[request.request_id] == 4

    assert await planner.handle(request, delivery(TOPICS.requests, request)) == []  # a redelivery
    outcome = TaskOutcome(task_id=task.task_id, request_id=task.request_id, chain=task.chain, step=task.step,
                          references=task.references, accepted=[{"example_id": f"e{n}", "data": MCQ} for n in range(2)],
                          usage=Usage(prompt_tokens=10, completion_tokens=10))
    outputs = await planner.handle(outcome, delivery(TOPICS.outcomes, outcome, partition=4))
    assert by_topic(outputs, TOPICS.tasks) == []
    assert by_topic(outputs, TOPICS.status)[-1].state == RequestState.COMPLETED

    await planner.on_revoked({4})
    assert request.request_id not in planner.plans


async def test_the_runner_dead_letters_poison_and_the_planner_rejects_what_it_can_name() -> None:
    planner = PlannerHandler(SETTINGS)
    runner = ServiceRunner(SETTINGS, planner)
    value = orjson.dumps({"request_id": "bad-1", "instruction": "x", "target_count": "many"})
    record = SimpleNamespace(topic=TOPICS.requests, partition=2, offset=7, key=b"bad-1", value=value)
    letter, rejected = await runner._handle_with_retries(record)
    assert letter.topic == TOPICS.dlq
    assert isinstance(letter.value, DeadLetter)
    assert (letter.value.source_topic, letter.value.partition, letter.value.offset) == (TOPICS.requests, 2, 7)
    assert letter.value.value == value.decode() and letter.value.error_type == "PoisonMessage"
    assert letter.value.service == "planner" and letter.value.key == "bad-1"
    assert isinstance(rejected.value, RequestStatus) and rejected.value.state == RequestState.REJECTED
    assert "target_count" in rejected.value.error

    garbage = SimpleNamespace(topic=TOPICS.requests, partition=2, offset=9, key=b"bad-2", value=b"\xff not json")
    letter, rejected = await runner._handle_with_retries(garbage)  # no id inside: the key names it
    assert "not JSON" in letter.value.error and rejected.value.request_id == "bad-2"

    outcome = SimpleNamespace(topic=TOPICS.outcomes, partition=2, offset=8, key=b"bad-1", value=value)
    (only,) = await runner._handle_with_retries(outcome)  # a broken outcome answers nothing on its own
    assert isinstance(only.value, DeadLetter) and only.value.source_topic == TOPICS.outcomes


async def test_curator_curates_and_forgets_the_partitions_it_gives_up() -> None:
    curator = CuratorHandler(SETTINGS)
    task = make_task(target=10)
    first = candidate(task, [item(1), item(2)])
    outputs = await curator.handle(first, delivery(TOPICS.candidates, first, partition=3))
    examples = by_topic(outputs, TOPICS.examples)
    assert [e.data for e in examples] == [item(1), item(2)]
    (outcome,) = by_topic(outputs, TOPICS.outcomes)
    assert [a.example_id for a in outcome.accepted] == [e.example_id for e in examples]

    again = candidate(make_task("t-1", target=10), [item(1), item(3)])
    outputs = await curator.handle(again, delivery(TOPICS.candidates, again, partition=3, offset=1))
    assert [e.data for e in by_topic(outputs, TOPICS.examples)] == [item(3)]
    assert by_topic(outputs, TOPICS.outcomes)[0].rejected == {"duplicate": 1}

    await curator.on_revoked({3})
    assert curator.state.requests == {} and curator.state.partition_of == {}


class _Pool:
    def __init__(self, result: CallResult) -> None:
        self.result = result
        self.calls = 0

    def get(self, alias: str) -> _Pool:
        return self

    async def complete(self, task: GenerationTask) -> CallResult:
        self.calls += 1
        return self.result


@pytest.mark.parametrize("error", [None, "HTTP 500 from the endpoint"])
async def test_generator_answers_each_task_once(error: str | None) -> None:
    result = CallResult(text=None if error else '{"examples": []}', usage=Usage(prompt_tokens=5, completion_tokens=3),
                        latency_s=0.1, attempts=2, outcome="5xx" if error else "ok", error=error, cost_usd=0.0, model="m")
    pool = _Pool(result)
    generator = GeneratorHandler(SETTINGS, pool=pool)  # type: ignore[arg-type]
    generator.ctx = FakeContext()
    task = make_task()
    where = delivery(TOPICS.tasks, task, partition=1, offset=5)
    outputs = await generator.handle(task, where)
    (answer,) = by_topic(outputs, TOPICS.candidates)
    assert isinstance(answer, Candidate) and answer.task == task and answer.error == error
    letters = by_topic(outputs, TOPICS.dlq)
    if error is None:
        assert letters == []
    else:
        (letter,) = letters
        assert (letter.error, letter.error_type, letter.attempts) == (error, "LLMCallFailed", 2)
        assert GenerationTask.model_validate_json(letter.value) == task and letter.offset == 5
    assert await generator.handle(task, where) == []  # redelivered: no second call
    assert pool.calls == 1


async def test_sink_writes_an_example_once(tmp_path) -> None:
    sink = SinkHandler(SETTINGS, directory=tmp_path, fsync=False)
    await sink.on_assigned({0})
    example = Example(example_id="e" * 32, request_id="req-1", data=MCQ, strategy="random", reference_ids=[None],
                      task_id="t" * 32, chain=0, step=0, model="m")
    for offset in range(2):
        assert await sink.handle(example, delivery(TOPICS.examples, example, offset=offset)) == []
    await sink.stop()
    assert (sink.written, sink.duplicates) == (1, 1)

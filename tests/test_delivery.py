"""Delivery guarantees of the runtime that a reading of the code found missing: partition counts
checked at start-up, outputs that can never be produced dead-lettered instead of blocking their
partition, and messages whose key is not their request id kept away from the request.

Each test says whether it runs on the real embedded broker or drives the runner's record path
directly, and, where the broker cannot show a fault (Tansu enforces no record size limit), how a
fault-injecting producer reproduces what Apache Kafka does.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError
from pydantic import BaseModel

from datacreator import cli
from datacreator.bus import runtime
from datacreator.bus.admin import TopicMismatch, ensure_topics
from datacreator.bus.codec import decode, encode
from datacreator.bus.factory import make_consumer, make_producer
from datacreator.bus.readback import read_to_end
from datacreator.bus.runtime import BaseHandler, Delivery, Output, ServiceRunner
from datacreator.config import Settings
from datacreator.contracts import (
    CreationRequest,
    DeadLetter,
    RequestState,
    RequestStatus,
    TaskOutcome,
)
from datacreator.embedded.broker import EmbeddedBroker
from datacreator.handlers.planner import PlannerHandler
from datacreator.serve import ServiceGroup
from tests.fixtures.broker import unique_topics
from tests.helpers import MCQ, MCQ_INSTRUCTION, candidate, item, make_task

FAST_GROUPS = {"kafka_session_timeout_ms": 3000, "kafka_heartbeat_interval_ms": 500}


def _settings(broker: EmbeddedBroker, partitions: int = 3) -> Settings:
    return Settings(
        kafka_bootstrap=broker.bootstrap, kafka_security_protocol="PLAINTEXT", topics=unique_topics(),
        topic_partitions=partitions, kafka_client_overrides=EmbeddedBroker.client_overrides(), **FAST_GROUPS,
    )


# -- item 5: partition counts ---------------------------------------------------------------


async def test_existing_topics_with_another_partition_count_stop_the_services_naming_them(broker):
    """Real broker: the request and outcome topics exist with 1 partition (as Kafka's auto-creation
    leaves them when a client names them first); start-up with topic_partitions=3 must refuse."""
    settings = _settings(broker, partitions=3)
    t = settings.topics
    await ensure_topics(settings, topics=[t.requests, t.outcomes], partitions=1)

    with pytest.raises(TopicMismatch) as raised:
        await ensure_topics(settings)
    message = str(raised.value)
    assert f"{t.requests} has 1" in message and f"{t.outcomes} has 1" in message and "expected 3" in message
    assert t.planner_state not in message  # created just now with 3: only the wrong ones are named
    assert cli._user_error(raised.value, None) == message  # `datacreator serve`: one line, no traceback

    with pytest.raises(TopicMismatch, match="wrong partition count"):
        await ServiceGroup(settings, ("planner",)).start()

    # A runner on its own (no group start-up check) finds it when its partitions are assigned.
    runner = ServiceRunner(settings, PlannerHandler(settings))
    with pytest.raises(TopicMismatch, match=t.outcomes):
        await asyncio.wait_for(runner.run(), 60)


# -- items 2 and 6: outputs that can never be produced ---------------------------------------


class Note(BaseModel):
    request_id: str
    depth: int = 0
    size: int = 0


class Payload(BaseModel):
    request_id: str
    data: Any = None


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


class EchoHandler(BaseHandler):
    """Answers each note with a small payload and then one `depth` deep or `size` bytes large."""

    name = "echo"

    def __init__(self, settings: Settings) -> None:
        self.inputs = {settings.topics.requests: Note}
        self.out = settings.topics.examples

    async def handle(self, message: Note, delivery: Delivery) -> list[Output]:
        outputs = [Output(self.out, message.request_id, Payload(request_id=message.request_id))]
        if message.depth or message.size:
            data = _nested(message.depth) if message.depth else "x" * message.size
            outputs.append(Output(self.out, message.request_id, Payload(request_id=message.request_id, data=data)))
        return outputs


async def _produce(settings: Settings, notes: list[Note], partition: int = 0) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for note in notes:
            await producer.send_and_wait(settings.topics.requests, encode(note), key=note.request_id.encode(),
                                         partition=partition)
    finally:
        await producer.stop()


async def _committed(settings: Settings, group_id: str, tp: TopicPartition) -> int | None:
    consumer = make_consumer(settings, group_id=group_id)
    await consumer.start()
    try:
        return await consumer.committed(tp)
    finally:
        await consumer.stop()


async def _run_until_committed(settings: Settings, runner: ServiceRunner, upto: int, timeout_s: float = 30) -> None:
    task = asyncio.create_task(runner.run())
    tp = TopicPartition(settings.topics.requests, 0)
    try:
        deadline = time.monotonic() + timeout_s
        while (await _committed(settings, runner.group_id, tp) or 0) < upto:
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, f"partition 0 never committed past {upto}: it is blocked"
            await asyncio.sleep(0.3)
    finally:
        runner.request_stop()
        await asyncio.wait_for(task, 30)


async def _read(settings: Settings, topic: str) -> list[Any]:
    return [r async for r in read_to_end(settings, topic)]


async def test_an_output_that_cannot_be_encoded_dead_letters_its_input_and_the_partition_moves_on(bus_settings):
    """Real broker: the second note's answer is nested 300 deep (pydantic: "Maximum serialization
    depth exceeded"). Nothing of that answer is sent, its input goes to the DLQ with the reason,
    and the note behind it is answered and committed."""
    settings = bus_settings.with_updates(**FAST_GROUPS)
    await _produce(settings, [Note(request_id="ok-1"), Note(request_id="deep", depth=300), Note(request_id="ok-2")])
    runner = ServiceRunner(settings, EchoHandler(settings))
    await _run_until_committed(settings, runner, upto=3)

    sent = [decode(Payload, r.value).request_id for r in await _read(settings, settings.topics.examples)]
    # Keyed by request id, the two answers may land on different partitions: compare as a set.
    assert sorted(sent) == ["ok-1", "ok-2"]  # the deep note's first, encodable payload was not sent either
    (letter,) = [decode(DeadLetter, r.value) for r in await _read(settings, settings.topics.dlq)]
    assert (letter.source_topic, letter.partition, letter.offset, letter.key) == (settings.topics.requests, 0, 1, "deep")
    assert "cannot encode the Payload" in letter.error and "depth" in letter.error
    assert letter.error_type == "UndeliverableOutput"


class SizeLimitedProducer:
    """A producer in front of a broker that refuses records over `limit` bytes, as Apache Kafka does
    (message.max.bytes, ~1 MB by default; Tansu has no such limit). `when="ack"` fails the record's
    future with the error the broker's produce response carries (MESSAGE_TOO_LARGE, code 10);
    `when="send"` raises from send() as aiokafka does for a record over max_request_size."""

    def __init__(self, inner: Any, limit: int, error: type[Exception], when: str) -> None:
        self.inner, self.limit, self.error, self.when = inner, limit, error, when
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None, **options: Any):
        if value is not None and len(value) > self.limit:
            self.refused += 1
            failure = self.error(f"the record of {len(value)} bytes is larger than {self.limit}")
            if self.when == "send":
                raise failure
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(failure)
            return future
        return await self.inner.send(topic, value, key=key, **options)


@pytest.mark.parametrize(("error", "when"), [(MessageSizeTooLargeError, "ack"), (RecordTooLargeError, "send")])
async def test_a_record_the_broker_refuses_for_good_dead_letters_its_input(bus_settings, monkeypatch, error, when):
    """Fault-injecting producer (see SizeLimitedProducer) on the real broker: a 50 kB answer over a
    20 kB limit was retried for ever; now its input goes to the DLQ and the partition moves on."""
    settings = bus_settings.with_updates(**FAST_GROUPS)
    producers: list[SizeLimitedProducer] = []

    def limited(s: Settings, **options: Any) -> SizeLimitedProducer:
        producers.append(SizeLimitedProducer(make_producer(s, **options), 20_000, error, when))
        return producers[-1]

    monkeypatch.setattr(runtime, "make_producer", limited)
    await _produce(settings, [Note(request_id="big", size=50_000), Note(request_id="ok")])
    runner = ServiceRunner(settings, EchoHandler(settings))
    await _run_until_committed(settings, runner, upto=2)

    assert producers[0].refused == 1  # refused once, not retried
    sent = [decode(Payload, r.value) for r in await _read(settings, settings.topics.examples)]
    # The big note's small first answer went out before the broker refused the second (at least
    # once, as for any partial publish); the refused record is nowhere.
    assert sorted(p.request_id for p in sent) == ["big", "ok"] and all(p.data is None for p in sent)
    (letter,) = [decode(DeadLetter, r.value) for r in await _read(settings, settings.topics.dlq)]
    assert (letter.offset, letter.key, letter.error_type) == (0, "big", "UndeliverableOutput")
    assert error.__name__ in letter.error and "bytes" in letter.error


class CountingHandler(BaseHandler):
    """Pipelined and ordered, as the curator: each note adds one to a count (the handler's state),
    is answered with a payload (large for a note of `size`) and then, at the last stage, with the
    count it saw. A give-up resets the count, as the curator forgets a request and reads it back."""

    name = "counting"
    ordered = True
    pipelined = True

    def __init__(self, settings: Settings) -> None:
        self.inputs = {settings.topics.requests: Note}
        self.topics_ = settings.topics
        self.count = 0
        self.heard: list[str] = []

    async def handle(self, message: Note, delivery: Delivery) -> list[Output]:
        self.count += 1
        data = "x" * message.size if message.size else None
        return [Output(self.topics_.examples, message.request_id, Payload(request_id=message.request_id, data=data)),
                Output(self.topics_.outcomes, message.request_id, Payload(request_id=message.request_id, data=self.count),
                       stage=1)]

    def on_dead_letter(self, message: Any, delivery: Delivery, reason: Exception) -> list[Output]:
        self.heard.append(message.request_id)
        self.count = 0
        return []


async def test_records_handled_before_a_give_up_was_heard_are_handled_again(bus_settings, monkeypatch):
    """Fault-injecting producer (see SizeLimitedProducer) on the real broker, pipelined handler:
    the first note's payload is refused at its acknowledgement, while the notes behind it were
    already handled on a count that included it. Every one of them must be handled again once the
    handler has heard of the give-up: the counts reported are those of the state after it (1, 2,
    3), never one that counted the refused note. Before, only the record right after the refused
    one was handled again."""
    settings = bus_settings.with_updates(**FAST_GROUPS)
    monkeypatch.setattr(runtime, "make_producer",
                        lambda s, **options: SizeLimitedProducer(make_producer(s, **options), 20_000,
                                                                 MessageSizeTooLargeError, "ack"))
    notes = [Note(request_id="big", size=50_000), Note(request_id="a"), Note(request_id="b"), Note(request_id="c")]
    await _produce(settings, notes)
    handler = CountingHandler(settings)
    await _run_until_committed(settings, ServiceRunner(settings, handler), upto=4)

    assert handler.heard == ["big"]
    reported = {(p := decode(Payload, r.value)).request_id: p.data for r in await _read(settings, settings.topics.outcomes)}
    assert set(reported) == {"a", "b", "c"}  # one outcome each; none for the note given up
    assert sorted(reported.values()) == [1, 2, 3], reported
    (letter,) = [decode(DeadLetter, r.value) for r in await _read(settings, settings.topics.dlq)]
    assert (letter.offset, letter.key) == (0, "big")


# -- item 8: key and request id ---------------------------------------------------------------


def _record(topic: str, key: str | None, value: bytes, partition: int = 1, offset: int = 0) -> SimpleNamespace:
    return SimpleNamespace(topic=topic, partition=partition, offset=offset,
                           key=key.encode() if key is not None else None, value=value)


async def test_a_message_keyed_otherwise_than_its_request_id_goes_to_the_dlq_and_rejects_nothing() -> None:
    """The runner's record path, no broker: this planner does not hold request `running-a` (another
    planner does, as with two planners whose partitions follow the key). Messages naming it under
    another key used to be planned or answered REJECTED here; now they only reach the DLQ."""
    settings = Settings(endpoints_json='{"default": {"base_url": "http://127.0.0.1:9", "model": "m"}}')
    t = settings.topics
    runner = ServiceRunner(settings, PlannerHandler(settings))
    valid = CreationRequest(request_id="running-a", instruction=MCQ_INSTRUCTION, formatting_example=MCQ, target_count=2)
    outcome = TaskOutcome(task_id="t", request_id="running-a", chain=0, step=0, references=[{"data": MCQ}])
    broken = orjson.dumps({"request_id": "running-a", "instruction": 5})
    cases = [
        (_record(t.requests, "other", encode(valid)), "is not the message's request_id 'running-a'"),
        # decodes, but the planner would refuse it (unknown endpoint): REJECTED for running-a before
        (_record(t.requests, "other", orjson.dumps({**valid.model_dump(mode="json"), "model": {"endpoint": "nowhere"}})),
         "is not the message's request_id"),
        (_record(t.outcomes, "other", encode(outcome)), "is not the message's request_id"),
        (_record(t.requests, None, encode(valid)), "key None"),
        (_record(t.requests, "other", broken), "instruction"),  # does not decode: names running-a in its value
        (_record(t.requests, None, broken), "instruction"),
    ]
    for record, reason in cases:
        outputs = await runner._handle_with_retries(record)
        assert [o.topic for o in outputs] == [t.dlq], (record.key, outputs)
        assert reason in outputs[0].value.error
    assert runner.handler.plans == {}

    # A message keyed by the id it names is still answered REJECTED when it was never accepted.
    (letter, rejected) = await runner._handle_with_retries(_record(t.requests, "new-b", orjson.dumps(
        {"request_id": "new-b", "instruction": 5})))
    assert letter.topic == t.dlq and isinstance(rejected.value, RequestStatus)
    assert (rejected.value.request_id, rejected.value.state) == ("new-b", RequestState.REJECTED)


async def test_a_curator_candidate_keyed_otherwise_goes_to_the_dlq() -> None:
    """The runner's record path, no broker: a candidate's request id is its task's."""
    from datacreator.handlers.curator import CuratorHandler

    settings = Settings(endpoints_json='{"default": {"base_url": "http://127.0.0.1:9", "model": "m"}}')
    runner = ServiceRunner(settings, CuratorHandler(settings))
    answer = candidate(make_task(target=10), [item(1)])
    (letter,) = await runner._handle_with_retries(_record(settings.topics.candidates, "other", encode(answer)))
    assert letter.topic == settings.topics.dlq
    assert f"request_id {answer.task.request_id!r}" in letter.value.error

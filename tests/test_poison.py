"""Poison messages on every input topic: each lands in the DLQ with its reason, and the partition
it sat in keeps moving (a valid request whose traffic shares that partition still completes).

The poison is published before the services start, at the head of the very partition the valid
request's requests, tasks, candidates, outcomes and examples go to, so a service that stalled on
a poison message would leave the request unfinished.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from datacreator import remote
from datacreator.bus.codec import decode
from datacreator.bus.factory import make_producer
from datacreator.bus.readback import read_to_end
from datacreator.config import Settings
from datacreator.contracts import (
    Candidate,
    CreationRequest,
    DeadLetter,
    Example,
    GenerationTask,
    RequestState,
    RequestStatus,
    Strategy,
    TaskOutcome,
    Usage,
)
from datacreator.handlers.sink import SinkHandler
from datacreator.serve import ServiceGroup, build_handler
from datacreator.stack import LLMTarget, endpoint_json
from tests.helpers import make_task

pytestmark = pytest.mark.slow

FAST_GROUPS = {"kafka_session_timeout_ms": 3000, "kafka_heartbeat_interval_ms": 500}
MAX_BYTES = 20_000
SEED = {"text": "The soup was cold and the waiter ignored us.", "label": "negative"}


def partition_of(key: str, partitions: int) -> int:
    """The partition the default partitioner sends `key` to (what every service's producer uses)."""
    return DefaultPartitioner()(key.encode(), list(range(partitions)), list(range(partitions)))


def sample_task(request_id: str = "sample") -> GenerationTask:
    return make_task(f"{request_id}-t0", request_id=request_id, target=4, seed=SEED, instruction="Write restaurant reviews.",
                     num_examples=2, example_schema={"type": "object"}, label_field=None, label_space=None)


def sample_messages() -> dict[str, dict[str, Any]]:
    """One valid message of each consumed type, as JSON-ready dicts (the base of deep corruptions)."""
    task = sample_task()
    candidate = Candidate(task=task, endpoint="default", model="m", raw_output="[]", usage=Usage(prompt_tokens=3))
    outcome = TaskOutcome(task_id=task.task_id, request_id=task.request_id, chain=0, step=0, references=task.references)
    example = Example(example_id="e1", request_id="sample", data=SEED, strategy=Strategy.random,
                      reference_ids=[None], task_id=task.task_id, chain=0, step=0, model="m")
    request = CreationRequest(request_id="sample", instruction="Write reviews.", formatting_example=SEED, target_count=3)
    return {name: m.model_dump(mode="json") for name, m in
            {"request": request, "task": task, "candidate": candidate, "outcome": outcome, "example": example}.items()}


@dataclass
class Poison:
    topic: str
    label: str
    value: bytes | None
    expect: str  # a piece of the DLQ reason
    request_id: str | None = None  # requests only: the id a REJECTED status must name
    partition: int = -1
    offset: int = -1


def _huge(extra: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps({**(extra or {}), "pad": "x" * (MAX_BYTES + 5_000)})


def poisons_for(settings: Settings) -> list[Poison]:
    t = settings.topics
    base = sample_messages()
    deep_request = {**base["request"], "request_id": "poison-deep", "model": {"temperature": "hot"}}
    deep_task = {**base["task"], "references": [{"data": "not an object"}]}
    deep_candidate = {**base["candidate"], "usage": {"prompt_tokens": "many", "completion_tokens": 0}}
    deep_outcome = {**base["outcome"], "accepted": [{"example_id": "e", "data": [1, 2]}]}
    deep_example = {**base["example"], "reference_ids": [{"id": 1}]}
    out = [
        Poison(t.requests, "not json", b"\x00\xff{not json", "not JSON", "poison-notjson"),
        Poison(t.requests, "wrong schema", b'{"request_id": "poison-schema", "instruction": "x"}', "formatting_example", "poison-schema"),
        Poison(t.requests, "huge", _huge({"request_id": "poison-huge"}), "exceeds the limit", "poison-huge"),
        Poison(t.requests, "empty", None, "empty message", "poison-empty"),
        Poison(t.requests, "deep types", orjson.dumps(deep_request), "model.temperature", "poison-deep"),
        Poison(t.requests, "unknown kind", b'{"kind": "explode", "request_id": "poison-kind"}', "kind", "poison-kind"),
    ]
    for topic, name, deep, where in (
        (t.tasks, "GenerationTask", deep_task, "references.0.data"),
        (t.candidates, "Candidate", deep_candidate, "usage.prompt_tokens"),
        (t.outcomes, "TaskOutcome", deep_outcome, "accepted.0.data"),
        (t.examples, "Example", deep_example, "reference_ids.0"),
    ):
        out += [
            Poison(topic, "not json", b"]]]{", f"invalid {name}"),
            Poison(topic, "wrong schema", b'{"hello": "world"}', f"invalid {name}"),
            Poison(topic, "huge", _huge(), "exceeds the limit"),
            Poison(topic, "empty", None, "empty message"),
            Poison(topic, "empty bytes", b"", f"invalid {name}"),
            Poison(topic, "deep types", orjson.dumps(deep), where),
        ]
    return out


async def publish_poisons(settings: Settings, poisons: list[Poison], partition: int) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for p in poisons:
            key = (p.request_id or f"poison-{p.label}").encode()
            meta = await producer.send_and_wait(p.topic, p.value, key=key, partition=partition)
            p.partition, p.offset = meta.partition, meta.offset
    finally:
        await producer.stop()


async def dead_letters(settings: Settings) -> list[DeadLetter]:
    return [decode(DeadLetter, r.value) async for r in read_to_end(settings, settings.topics.dlq)]


async def statuses(settings: Settings) -> dict[str, RequestStatus]:
    latest: dict[str, RequestStatus] = {}
    async for record in read_to_end(settings, settings.topics.status):
        status = decode(RequestStatus, record.value)
        latest[status.request_id] = status
    return latest


def _sunk_rows(directory: Path, request_id: str) -> list[dict[str, Any]]:
    rows = []
    for path in directory.rglob("*.jsonl"):
        for line in path.read_bytes().splitlines():
            row = orjson.loads(line)
            if row.get("request_id") == request_id:
                rows.append(row)
    return rows


async def test_poison_on_every_input_topic_is_dead_lettered_and_the_partition_keeps_moving(bus_settings, simulator, tmp_path):
    settings = bus_settings.with_updates(
        endpoints_json=endpoint_json(LLMTarget(simulator.base_url, "datacreator-simulator")),
        max_message_bytes=MAX_BYTES, **FAST_GROUPS,
    )
    request = CreationRequest(instruction="Write short restaurant reviews labelled positive or negative.",
                              formatting_example=SEED, target_count=6, examples_per_call=3, chains=2)
    partition = partition_of(request.request_id, settings.kafka.topic_partitions)
    poisons = poisons_for(settings)
    await publish_poisons(settings, poisons, partition)

    def handlers(name: str, s: Settings):
        return SinkHandler(s, directory=tmp_path / "sink", fsync=False) if name == "sink" else build_handler(name, s)

    group = await ServiceGroup(settings, ("planner", "generator", "curator", "sink"), handler_factory=handlers).start()
    try:
        await remote.submit(settings, request)
        final = await remote.wait_for_final(settings, request.request_id, timeout_s=60)
        assert final.state == RequestState.COMPLETED, final.error
        assert final.accepted == 6

        letters = {(d.source_topic, d.partition, d.offset): d for d in await dead_letters(settings)}
        for p in poisons:
            letter = letters.get((p.topic, p.partition, p.offset))
            assert letter is not None, f"{p.label} on {p.topic} did not reach the DLQ"
            assert p.expect in letter.error, (p.label, p.topic, letter.error)
            assert letter.error_type == "PoisonMessage"
            assert letter.service in ("planner", "generator", "curator", "sink")
            if p.value is not None and len(p.value) <= 10_000:
                assert letter.value == p.value.decode("utf-8", "replace")

        latest = await statuses(settings)
        for p in poisons:
            if p.request_id is not None:
                status = latest.get(p.request_id)
                assert status is not None and status.state == RequestState.REJECTED, p.label
                assert p.expect in (status.error or ""), (p.label, status.error)

        # The sink, behind six poison messages in the same partition, still wrote every example.
        rows = _sunk_rows(tmp_path / "sink", request.request_id)
        assert len({r["example_id"] for r in rows}) == 6
    finally:
        await group.stop()


async def test_invalid_but_well_formed_requests_are_rejected_naming_the_problem(bus_settings, simulator):
    settings = bus_settings.with_updates(
        endpoints_json=endpoint_json(LLMTarget(simulator.base_url, "datacreator-simulator")), **FAST_GROUPS,
    )
    base = sample_messages()["request"]
    cases = {
        "bad-endpoint": ({"model": {"endpoint": "nowhere"}}, "unknown endpoint 'nowhere'"),
        "bad-label-field": ({"label_field": "missing.path"}, "label_field 'missing.path'"),
        "bad-label-space": ({"label_field": "label", "label_space": ["pos", "neu"]}, "not in label_space"),
        "bad-target": ({"target_count": 0}, "target_count"),
        "bad-extra": ({"colour": "blue"}, "colour"),
        "bad-strategy": ({"strategy": "sideways"}, "strategy"),
    }
    group = await ServiceGroup(settings, ("planner",)).start()
    try:
        for request_id, (change, _) in cases.items():
            await remote.publish_raw(settings, settings.topics.requests, request_id,
                                     orjson.dumps({**base, "request_id": request_id, **change}))
        for request_id, (_, expected) in cases.items():
            final = await remote.wait_for_final(settings, request_id, timeout_s=30)
            assert final.state == RequestState.REJECTED
            assert expected in (final.error or ""), (request_id, final.error)
    finally:
        await group.stop()

"""An ordered handler's records that queue up while the ones before them are published are handled
in order and published together, in one round of acknowledgements (bus/runtime.py, GROUP_RECORDS).
Drives a ServiceRunner's partition worker without a broker: each publish call is recorded in
order, and the first one is held open, as a slow acknowledgement would be."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition

from datacreator.bus import runtime
from datacreator.bus.runtime import BaseHandler, Output, ServiceRunner, UndeliverableOutput, _PartitionTrack, value_of
from datacreator.config import Settings
from datacreator.contracts import Usage

TP = TopicPartition("in", 0)


class _Ordered(BaseHandler):
    name = "group-test"
    inputs: dict[str, Any] = {"in": Usage}
    ordered = True


class _Harness:
    def __init__(self, refused: frozenset[int] = frozenset()) -> None:
        self.runner = ServiceRunner(Settings(), _Ordered())
        self.calls: list[list[tuple[str, Any]]] = []
        self.handled: list[int] = []
        self.first_ack = asyncio.Event()
        self.refused = refused
        self.runner._publish = self._publish  # type: ignore[method-assign]
        self.runner._handle = self._handle  # type: ignore[method-assign]
        self.track = _PartitionTrack()
        self.runner._tracks[TP] = self.track

    async def _publish(self, outputs: list[Output], producer: Any = None) -> None:
        if not self.calls:
            self.calls.append([])
            await self.first_ack.wait()
            self.calls[0] = [(o.topic, value_of(o)) for o in outputs]
            return
        values = [(o.topic, value_of(o)) for o in outputs]
        if any(o.topic == "tasks" and value_of(o).prompt_tokens in self.refused for o in outputs):
            self.calls.append([("refused", v) for _, v in values])
            raise UndeliverableOutput("too large")
        self.calls.append(values)

    async def _handle(self, record: Any, delivery: Any) -> tuple[list[Output], Any]:
        self.handled.append(record.offset)
        return [Output("tasks", delivery.key, Usage(prompt_tokens=record.offset))], Usage(prompt_tokens=record.offset)

    def put(self, offset: int, key: bytes = b"r1") -> None:
        self.track.add(offset)
        self.runner._in_flight += 1
        self.runner._ensure_worker(TP, self.track)
        assert self.track.queue is not None
        self.track.queue.put_nowait(SimpleNamespace(topic="in", partition=0, offset=offset, key=key, value=b"{}", timestamp=0))

    async def settle(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0)

    async def stop(self) -> None:
        assert self.track.worker is not None
        self.track.worker.cancel()
        await asyncio.gather(self.track.worker, return_exceptions=True)


def _tasks(*offsets: int) -> list[tuple[str, Any]]:
    return [("tasks", Usage(prompt_tokens=n)) for n in offsets]


async def test_records_queued_behind_a_publish_go_out_together_and_in_order():
    h = _Harness()
    try:
        h.put(0)
        await h.settle()
        for offset in range(1, 6):
            h.put(offset, key=b"r1" if offset % 2 else b"r2")  # two requests of one partition
        await h.settle()
        assert h.handled == [0]  # the rest waits: record 0's output is not acknowledged yet
        assert h.track.committable() is None
        h.first_ack.set()
        await h.settle()
        assert h.handled == [0, 1, 2, 3, 4, 5]
        assert h.calls == [_tasks(0), _tasks(1, 2, 3, 4, 5)]  # one round for the five
        assert h.track.committable() == 6
    finally:
        await h.stop()


async def test_a_job_queued_among_records_runs_after_the_records_before_it():
    h = _Harness()
    ran: list[list[int]] = []

    async def job() -> list[Output]:
        ran.append(list(h.handled))
        return [Output("status", "r1", Usage(prompt_tokens=99))]

    try:
        h.put(0)
        await h.settle()
        h.put(1)
        h.put(2)
        assert h.track.queue is not None
        h.track.queue.put_nowait(job)
        h.put(3)
        h.first_ack.set()
        await h.settle()
        assert ran == [[0, 1, 2]]  # not after record 3: the job keeps its place in the queue
        assert h.calls == [_tasks(0), _tasks(1, 2), [("status", Usage(prompt_tokens=99))], _tasks(3)]
        assert h.track.committable() == 4
    finally:
        await h.stop()


async def test_a_refused_output_in_a_group_gives_up_only_its_own_record():
    h = _Harness(refused=frozenset({2}))
    try:
        h.put(0)
        await h.settle()
        for offset in (1, 2, 3):
            h.put(offset)
        h.first_ack.set()
        await h.settle()
        dlq = h.runner.settings.topics.dlq
        assert h.calls[1] == [("refused", v) for _, v in _tasks(1, 2, 3)]
        assert h.calls[2:4] == [_tasks(1), [("refused", v) for _, v in _tasks(2)]]  # each on its own
        assert [topic for topic, _ in h.calls[4]] == [dlq]  # record 2's dead letter
        assert h.calls[5:] == [_tasks(3)]
        assert h.track.committable() == 4  # all finished: record 2 by its dead letter
    finally:
        await h.stop()


async def test_a_group_is_at_most_group_records_long(monkeypatch):
    monkeypatch.setattr(runtime, "GROUP_RECORDS", 3)
    h = _Harness()
    try:
        h.put(0)
        await h.settle()
        for offset in range(1, 8):
            h.put(offset)
        h.first_ack.set()
        await h.settle()
        assert h.calls == [_tasks(0), _tasks(1, 2, 3), _tasks(4, 5, 6), _tasks(7)]
        assert h.track.committable() == 8
    finally:
        await h.stop()


async def test_two_partitions_groups_of_the_same_keys_in_opposite_orders_both_finish():
    # A request's requests and outcomes partitions have a worker each: a group taking its keys as
    # it met them would hold r2 and wait for r1 while the other holds r1 and waits for r2.
    h = _Harness()
    h.first_ack.set()
    h.calls.append([])  # no publish is held open here

    async def handle(record: Any, delivery: Any) -> tuple[list[Output], Any]:
        await asyncio.sleep(0.01)  # the other group gets to take a lock between two records
        return [Output("tasks", delivery.key, Usage(prompt_tokens=record.offset))], None

    h.runner._handle = handle  # type: ignore[method-assign]
    tracks = {p: _PartitionTrack() for p in (0, 1)}

    def group(partition: int, keys: list[bytes]) -> list[SimpleNamespace]:
        for offset in range(len(keys)):
            tracks[partition].add(offset)
            h.runner._in_flight += 1
        return [SimpleNamespace(topic="in", partition=partition, offset=o, key=k, value=b"{}", timestamp=0)
                for o, k in enumerate(keys)]

    await asyncio.wait_for(asyncio.gather(
        h.runner._process(TopicPartition("in", 0), tracks[0], group(0, [b"r2", b"r1"])),
        h.runner._process(TopicPartition("in", 1), tracks[1], group(1, [b"r1", b"r2"])),
    ), timeout=5)
    assert tracks[0].committable() == 2 and tracks[1].committable() == 2
    assert sorted(v.prompt_tokens for call in h.calls[1:] for _, v in call) == [0, 0, 1, 1]

"""Compacted topics on a real Kafka: which record survives, who writes it, and what a restore reads.

Kafka's log cleaner keeps, per key, the record of highest offset; Tansu (the embedded broker)
never compacts. These tests therefore read what the broker holds and apply the cleaner's rule
themselves (`compacted`, `compacted_read_to_end`): the record of highest offset per key, a
tombstone deleting its key. A record that lands late, as a batch aiokafka retries after its
acknowledgement timed out (no idempotence), is reproduced by `ReorderingProducer`: Tansu
acknowledges in order, so the wrapper holds a record back until a later one has been sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from aiokafka.consumer.fetcher import ConsumerRecord

from datacreator import remote
from datacreator.bus import runtime
from datacreator.bus.codec import decode, encode, encode_key
from datacreator.bus.factory import make_consumer, make_producer
from datacreator.bus.readback import StatusWatcher, read_to_end
from datacreator.bus.runtime import ServiceRunner
from datacreator.config import Settings
from datacreator.consumer import ExampleStream
from datacreator.contracts import (
    CancelRequest,
    CreationRequest,
    Example,
    GenerationTask,
    PlannerSnapshot,
    RequestState,
    RequestStatus,
    Strategy,
    TaskOutcome,
)
from datacreator.handlers import planner as planner_module
from datacreator.handlers.planner import PlannerHandler
from datacreator.logic.dedup import example_id
from tests.helpers import MCQ, MCQ_INSTRUCTION, candidate, item, make_task

pytestmark = pytest.mark.timeout(90)

FAST = {"kafka_session_timeout_ms": 3000, "kafka_heartbeat_interval_ms": 500, "status_interval_s": 0.1}


async def compacted(settings: Settings, topic: str) -> dict[str, ConsumerRecord]:
    """What the log cleaner leaves of `topic`: per key, the record of highest offset."""
    latest: dict[str, ConsumerRecord] = {}
    async for record in read_to_end(settings, topic):
        latest[record.key.decode()] = record
    return latest


async def compacted_read_to_end(settings: Settings, topic: str, partitions: Iterable[int] | None = None, *,
                                complete: bool = False) -> AsyncIterator[ConsumerRecord]:
    """`read_to_end` of a topic after compaction (the last record of each key, in offset order)."""
    latest: dict[bytes | None, ConsumerRecord] = {}
    async for record in read_to_end(settings, topic, partitions, complete=complete):
        latest[record.key] = record
    for record in sorted(latest.values(), key=lambda r: (r.partition, r.offset)):
        yield record


async def produce(settings: Settings, topic: str, messages: list[tuple[str, Any]]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for key, message in messages:
            await producer.send_and_wait(topic, None if message is None else encode(message), key=encode_key(key))
    finally:
        await producer.stop()


def _request(request_id: str, **fields: Any) -> CreationRequest:
    values: dict[str, Any] = dict(request_id=request_id, instruction=MCQ_INSTRUCTION, formatting_example=MCQ,
                                  target_count=40, examples_per_call=2, chains=2)
    values.update(fields)
    return CreationRequest(**values)


async def _wait_for(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s"
        await asyncio.sleep(0.1)


async def _records(settings: Settings, topic: str) -> list[ConsumerRecord]:
    return [r async for r in read_to_end(settings, topic)]


# -- readers: the status that supersedes, not the last record nor the latest clock -------------


async def test_a_status_landing_after_the_final_one_does_not_reopen_the_request(bus_settings):
    """Real broker. Planner A (clock 5 s ahead) wrote RUNNING, version 2; planner B took the
    request over and completed it, version 3, on a correct clock; A's RUNNING was retried and lands
    last. Readers chose by `updated_at` (RUNNING, 105 > 100): `datacreator status` said RUNNING,
    `wait_for_final` and `iter_examples(stop_at_completion=True)` never ended."""
    rid = "req-skew"
    base = dict(request_id=rid, target_count=3)
    running = RequestStatus(state=RequestState.RUNNING, version=2, accepted=2, updated_at=105.0, **base)
    completed = RequestStatus(state=RequestState.COMPLETED, version=3, accepted=3, updated_at=100.0, finished_at=100.0, **base)
    older_running = RequestStatus(state=RequestState.RUNNING, version=9, accepted=1, updated_at=106.0, **base)
    topic = bus_settings.topics.status
    await produce(bus_settings, topic, [(rid, running), (rid, completed), (rid, running), (rid, older_running)])

    latest = await remote.latest_status(bus_settings, rid)
    assert latest is not None and (latest.state, latest.version) == (RequestState.COMPLETED, 3)
    final = await remote.wait_for_final(bus_settings, rid, timeout_s=20)
    assert final.state is RequestState.COMPLETED
    watcher = StatusWatcher(bus_settings)  # what a following watcher (generators, curators) holds
    for record in await _records(bus_settings, topic):
        watcher._apply(record)
    assert watcher.latest[rid].state is RequestState.COMPLETED and watcher.is_closed(rid)
    stream = ExampleStream(bus_settings, rid, stop_at_completion=True, completion_grace_s=0.5)
    assert [e async for e in stream] == [] and stream.final_status is not None
    assert stream.final_status.state is RequestState.COMPLETED


async def _true(value: bool) -> bool:
    return value


def test_supersedes_orders_by_version_and_never_reopens_a_final_status():
    s = lambda state, version, at: RequestStatus(request_id="r", state=state, version=version, updated_at=at)  # noqa: E731
    assert s(RequestState.RUNNING, 2, 1.0).supersedes(s(RequestState.RUNNING, 1, 9.0))
    assert not s(RequestState.RUNNING, 1, 9.0).supersedes(s(RequestState.RUNNING, 2, 1.0))
    assert not s(RequestState.RUNNING, 7, 9.0).supersedes(s(RequestState.CANCELLED, 3, 1.0))
    assert s(RequestState.RUNNING, 2, 5.0).supersedes(s(RequestState.RUNNING, 2, 4.0))  # a ticker's repeat
    assert s(RequestState.COMPLETED, 0, 5.0).supersedes(s(RequestState.RUNNING, 0, 4.0))  # records without versions
    assert s(RequestState.COMPLETED, 1, 1.0).supersedes(None)


# -- writers: one writer per request id ------------------------------------------------------------


class ReorderingProducer:
    """Holds back the first record sent to `topic` once `armed` is set, until another record to
    that topic has been sent (it then lands after it) or `hold_s` has passed. This is what a retried
    batch does on Kafka: its acknowledgement timed out, a later batch was appended, the retry lands
    after it. Tansu acknowledges in order and never shows it."""

    def __init__(self, inner: Any, topic: str, hold_s: float = 1.5) -> None:
        self.inner, self.topic, self.hold_s = inner, topic, hold_s
        self.armed = asyncio.Event()
        self.holding = asyncio.Event()
        self.overtaken = False
        self._release = asyncio.Event()
        self._used = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None, **options: Any):
        if topic != self.topic or not self.armed.is_set():
            return await self.inner.send(topic, value, key=key, **options)
        if self._used:
            future = await self.inner.send(topic, value, key=key, **options)
            if self.holding.is_set() and not self._release.is_set():
                self.overtaken = True
                await future  # appended: the held record goes after it
                self._release.set()
            return future
        self._used = True
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def later() -> None:
            self.holding.set()
            try:
                await asyncio.wait_for(self._release.wait(), self.hold_s)
            except TimeoutError:
                self._release.set()
            try:
                result.set_result(await (await self.inner.send(topic, value, key=key, **options)))
            except Exception as exc:
                result.set_exception(exc)

        self._task = asyncio.create_task(later())
        return result


async def _first_task(settings: Settings, rid: str) -> GenerationTask:
    found: list[GenerationTask] = []

    async def any_task() -> bool:
        found[:] = [t for t in (decode(GenerationTask, r.value) for r in await _records(settings, settings.topics.tasks))
                    if t.request_id == rid]
        return bool(found)

    await _wait_for(any_task, "planned")
    return found[0]


async def test_a_cancel_and_an_outcome_of_one_request_write_one_at_a_time(bus_settings, monkeypatch):
    """Real broker, fault-injecting producer (ReorderingProducer). An outcome is handled: its
    snapshot (RUNNING) is in flight and held; the cancel of the same request arrives on the other
    topic, handled by the other partition's worker. It used to be handled at once and its
    CANCELLED snapshot appended first: compaction kept RUNNING, and the cancelled request came back
    after a restore. Now the cancel waits until the outcome's writes are acknowledged."""
    settings = bus_settings.with_updates(**FAST)
    t = settings.topics
    producers: list[ReorderingProducer] = []

    def reordering(s: Settings, **options: Any) -> ReorderingProducer:
        producers.append(ReorderingProducer(make_producer(s, **options), t.planner_state))
        return producers[-1]

    monkeypatch.setattr(runtime, "make_producer", reordering)
    rid = "req-race"
    await produce(settings, t.requests, [(rid, _request(rid))])
    runner = ServiceRunner(settings, PlannerHandler(settings))
    running = asyncio.create_task(runner.run())
    try:
        task = await _first_task(settings, rid)
        producers[0].armed.set()
        outcome = TaskOutcome(task_id=task.task_id, request_id=rid, chain=task.chain, step=task.step,
                              references=task.references)
        await produce(settings, t.outcomes, [(rid, outcome)])
        await asyncio.wait_for(producers[0].holding.wait(), 20)
        await produce(settings, t.requests, [(rid, CancelRequest(request_id=rid))])
        final = await remote.wait_for_final(settings, rid, timeout_s=30)
        assert final.state is RequestState.CANCELLED
    finally:
        runner.request_stop()
        await asyncio.wait_for(running, 30)

    assert not producers[0].overtaken, "the cancel's snapshot was sent while the outcome's was in flight"
    kept = decode(PlannerSnapshot, (await compacted(settings, t.planner_state))[rid].value)
    assert kept.plan["state"] == RequestState.CANCELLED.value
    # A planner restoring after compaction, and one restoring every record, both resume it CANCELLED.
    for reader in (compacted_read_to_end, read_to_end):
        monkeypatch.setattr(planner_module, "read_to_end", reader)
        fresh = PlannerHandler(settings)
        latest = await fresh._read_snapshots(list(range(settings.kafka.topic_partitions)))
        assert latest[rid][1].plan["state"] == RequestState.CANCELLED.value
    versions = [decode(PlannerSnapshot, r.value).version for r in await _records(settings, t.planner_state)]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)  # landed in version order
    statuses = [decode(RequestStatus, r.value) for r in await _records(settings, t.status)]
    assert [s.version for s in statuses] == sorted(s.version for s in statuses)
    assert statuses[-1].state is RequestState.CANCELLED  # the compacted status is the final one


async def test_restore_keeps_the_highest_version_whatever_landed_last(bus_settings):
    """Real broker: snapshots of one request in the order a retry leaves them (version 3, then a
    retried version 2). The planner restored the last record; it restores version 3 now."""
    t = bus_settings.topics
    rid = "req-order"
    plan = planner_module.RequestPlan.start(_request(rid), 1.0)
    newer = plan.snapshot()
    plan.cancel("stop", 2.0)
    cancelled = plan.snapshot()
    await produce(bus_settings, t.planner_state, [
        (rid, PlannerSnapshot(request_id=rid, plan=cancelled, version=3)),
        (rid, PlannerSnapshot(request_id=rid, plan=newer, version=2)),
    ])
    planner = PlannerHandler(bus_settings)
    latest = await planner._read_snapshots(list(range(bus_settings.kafka.topic_partitions)))
    assert latest[rid][1].version == 3 and latest[rid][1].plan["state"] == RequestState.CANCELLED.value


# -- tombstones and rebalances --------------------------------------------------------------------


async def test_a_finished_requests_snapshot_is_deleted_after_the_retention(bus_settings):
    """Real broker. Every snapshot ever written stayed on the planner-state topic, so a planner
    taking partitions over read all of them. A finished request's snapshot is now deleted with a
    tombstone after `snapshot_retention_s`, the planner forgets the request, and a redelivered
    creation request does not start it again."""
    settings = bus_settings.with_updates(**FAST, snapshot_retention_s=0.5)
    t = settings.topics
    rid = "req-retire"
    request = _request(rid)
    await produce(settings, t.requests, [(rid, request)])
    handler = PlannerHandler(settings)
    runner = ServiceRunner(settings, handler)
    running = asyncio.create_task(runner.run())
    try:
        await _first_task(settings, rid)
        await produce(settings, t.requests, [(rid, CancelRequest(request_id=rid))])
        await remote.wait_for_final(settings, rid, timeout_s=30)

        async def tombstoned() -> bool:
            last = (await compacted(settings, t.planner_state)).get(rid)
            return last is not None and last.value is None

        await _wait_for(tombstoned, "tombstoned")
        await _wait_for(lambda: _true(rid not in handler.plans), "forgotten")
        await produce(settings, t.requests, [(rid, request)])  # a redelivery of the request
        (last,) = [r for r in await _records(settings, t.requests)][-1:]

        async def handled() -> bool:
            track = runner._tracks.get(runtime.TopicPartition(t.requests, last.partition))
            return track is not None and (track.committed or 0) > last.offset

        await _wait_for(handled, "handled")
    finally:
        runner.request_stop()
        await asyncio.wait_for(running, 30)
    assert rid not in handler.plans
    states = [decode(RequestStatus, r.value).state for r in await _records(settings, t.status)]
    assert states[-1] is RequestState.CANCELLED and RequestState.ACCEPTED not in states[states.index(RequestState.CANCELLED):]
    fresh = PlannerHandler(settings)
    assert await fresh._read_snapshots(list(range(settings.kafka.topic_partitions))) == {}
    assert fresh._ended.released(rid) is not None  # remembered as let go: a redelivery starts nothing
    left = [r for r in (await compacted(settings, t.planner_state)).values()]
    assert [r.value for r in left] == [None]  # after compaction: the tombstone alone


async def test_a_partition_that_stays_keeps_its_plans_across_a_rebalance(bus_settings, monkeypatch):
    """Real broker. Every rebalance revokes every partition; the planner dropped its plans and read
    every snapshot of the partitions back. Now a partition assigned again keeps its plans, unless
    someone wrote to its planner-state partition meanwhile (then it is read back)."""
    settings = bus_settings.with_updates(**FAST)
    t = settings.topics
    handler = PlannerHandler(settings)
    runner = ServiceRunner(settings, handler)
    runner._producer = make_producer(settings)
    await runner._producer.start()
    handler.ctx = runner
    reads: list[list[int]] = []
    real_read = planner_module.read_to_end

    def counting(s: Settings, topic: str, partitions: Iterable[int] | None = None, **options: Any) -> AsyncIterator[ConsumerRecord]:
        reads.append(sorted(partitions or []))
        return real_read(s, topic, partitions, **options)

    monkeypatch.setattr(planner_module, "read_to_end", counting)
    try:
        await handler.on_assigned({0, 1, 2})  # the take-over, as the runner makes it (nothing to read yet)
        reads.clear()
        rid = "req-stay"
        request = _request(rid)
        delivery = runtime.Delivery(t.requests, 1, 0, rid, encode(request))
        await runner.publish(await handler.handle(request, delivery))
        plan = handler.plans[rid]

        await handler.on_revoked({0, 1, 2})
        assert handler.plans == {}  # nothing of a revoked partition is touched until it is back
        await handler.on_assigned({1, 2})
        assert handler.plans[rid] is plan and reads == []

        await handler.on_revoked({1, 2})
        # Another planner held partition 1 meanwhile and wrote a newer snapshot.
        other = planner_module.RequestPlan.start(request, 5.0)
        other.cancel("by the other planner", 6.0)
        await produce(settings, t.planner_state, [(rid, PlannerSnapshot(request_id=rid, plan=other.snapshot(), version=99))])
        await handler.on_assigned({1, 2})
        assert reads == [[1]]
        assert handler.plans[rid] is not plan and handler.plans[rid].state is RequestState.CANCELLED
        assert handler.versions[rid] == 99
    finally:
        await runner._producer.stop()


# -- snapshot size ----------------------------------------------------------------------------------


async def test_a_request_whose_snapshot_would_outgrow_a_record_is_rejected_with_a_reason():
    """No broker needed: the planner's own decision. 256 chains x 5 examples of ~1.5 kB made
    snapshots of 2 MB (Kafka refuses records over ~1 MB by default, and the plan stayed in the
    planner's memory without its snapshot). Such a request is REJECTED at once now."""
    from tests.test_handlers import SETTINGS, FakeContext, by_topic, delivery

    planner = PlannerHandler(SETTINGS)
    planner.ctx = FakeContext()
    seed = dict(MCQ, question="q " * 700)
    big = CreationRequest(instruction=MCQ_INSTRUCTION, formatting_example=seed, target_count=5000,
                          examples_per_call=5, chains=256)
    outputs = await planner.handle(big, delivery(SETTINGS.topics.requests, big))
    (status,) = by_topic(outputs, SETTINGS.topics.status)
    assert status.state is RequestState.REJECTED and "snapshot" in (status.error or "")
    assert "max_message_bytes" in (status.error or "") and big.request_id not in planner.plans

    fits = big.model_copy(update={"request_id": "fits", "chains": 16})
    outputs = await planner.handle(fits, delivery(SETTINGS.topics.requests, fits))
    assert by_topic(outputs, SETTINGS.topics.status)[0].state is RequestState.RUNNING
    (snapshot,) = by_topic(outputs, SETTINGS.topics.planner_state)
    assert len(encode(snapshot)) < SETTINGS.kafka.max_message_bytes


# -- the curator's restore -----------------------------------------------------------------------


def _published(rid: str, n: int) -> list[Example]:
    return [Example(example_id=example_id(rid, item(i)), request_id=rid, data=item(i), strategy=Strategy.random,
                    reference_ids=[None], task_id=f"{rid}-t{i // 5}", chain=0, step=i // 5, model="m") for i in range(n)]


async def test_the_curator_restores_in_batches_and_keeps_partitions_that_stay(bus_settings, monkeypatch):
    """Real broker. The curator restored one example at a time (a dedup `add` each, ~8 s per 100k
    on the event loop, see docs/benchmarks.md) and re-read the whole examples topic at every
    rebalance. Now the index is built in slices, and a partition given back unchanged keeps its
    state; one that someone published on meanwhile is read again."""
    from datacreator.handlers import curator as curator_module
    from datacreator.handlers.curator import CuratorHandler
    from datacreator.logic import dedup

    t = bus_settings.topics
    rid = "req-restore"
    examples = _published(rid, 1500)
    await produce(bus_settings, t.examples, [(rid, e) for e in examples])
    partition = (await _records(bus_settings, t.examples))[0].partition
    adds = {"add": 0, "add_many": 0}
    for name in adds:
        original = getattr(dedup.DedupIndex, name, None)
        if original is None:
            continue

        def counted(self, *args, _original=original, _name=name, **kwargs):
            adds[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(dedup.DedupIndex, name, counted)
    reads: list[list[int]] = []

    def counting(s: Settings, topic: str, partitions: Iterable[int] | None = None, **options: Any) -> AsyncIterator[ConsumerRecord]:
        reads.append(sorted(partitions or []))
        return read_to_end(s, topic, partitions, **options)

    monkeypatch.setattr(curator_module, "read_to_end", counting, raising=False)

    handler = CuratorHandler(bus_settings)
    handler.ctx = None  # type: ignore[assignment]  # nothing is published by a restore
    await handler.on_assigned({0, 1, 2})
    task = make_task("t-new", request_id=rid, target=10_000)
    outputs = await handler.handle(candidate(task, [item(3), item(5000)]), runtime.Delivery(t.candidates, partition, 0, rid))
    (outcome,) = [o.value for o in outputs if o.topic == t.outcomes]
    assert outcome.rejected == {"duplicate": 1} and len(outcome.accepted) == 1  # the restored state is whole
    assert adds["add"] <= 1 and 1 <= adds["add_many"] <= 3, adds  # 1500 restored in slices of 1000, not one by one
    curation = handler.state.requests[rid]
    assert curation.accepted_count == 1501

    await handler.on_revoked({0, 1, 2})
    assert handler.state.requests == {}
    await handler.on_assigned({0, 1, 2})
    assert handler.state.requests[rid] is curation and reads == [[0, 1, 2]]  # kept, not read again

    await handler.on_revoked({0, 1, 2})
    await produce(bus_settings, t.examples, [(rid, e) for e in _published(rid, 1502)[1500:]])  # another curator's
    await handler.on_assigned({0, 1, 2})
    assert reads[1:] == [[partition]]
    assert handler.state.requests.get(rid) is None and handler.state.has_pending(rid)  # indexed with the next task


# -- offsets lost below the committed one --------------------------------------------------------


class KafkaOffsetsConsumer:
    """What Apache Kafka answers where Tansu does not: commit metadata is kept (Tansu returns an
    empty string), and `offsets_for_times` gives the first offset whose record time is at or after
    the time asked, None when there is none (Tansu answers offset 0 to every such request)."""

    metadata: dict[Any, str] = {}  # the group's commit metadata, by partition

    def __init__(self, inner: Any, settings: Settings) -> None:
        self.inner, self.settings = inner, settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self, offsets: Any = None) -> None:
        for tp, meta in (offsets or {}).items():
            self.metadata[tp] = getattr(meta, "metadata", "")
        await self.inner.commit(offsets)

    async def offsets_for_times(self, timestamps: dict[Any, int]) -> dict[Any, Any]:
        from aiokafka.structs import OffsetAndTimestamp

        out: dict[Any, Any] = {}
        for tp, since in timestamps.items():
            found = [r async for r in read_to_end(self.settings, tp.topic, [tp.partition]) if r.timestamp >= since]
            out[tp] = OffsetAndTimestamp(found[0].offset, found[0].timestamp) if found else None
        return out


async def test_offsets_lost_below_the_commit_resume_from_the_last_committed_records_time(bus_settings, monkeypatch):
    """Real broker, Kafka's offset answers from `KafkaOffsetsConsumer`. An unclean leader election
    left partition 0 ending at 10 while offset 15 was committed (records 10-14 are gone); records
    10 and 11 written since are new. The runner read the partition from offset 0 again, answering
    (and, for a generator, paying for) every record a second time; it now resumes at the first
    record not older than the last one committed, less a minute for the producers' clocks."""
    from aiokafka import TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    from tests.test_delivery import EchoHandler, Note, Payload, _committed

    settings = bus_settings.with_updates(kafka_session_timeout_ms=3000, kafka_heartbeat_interval_ms=500)
    t = settings.topics
    tp = TopicPartition(t.requests, 0)
    now_ms = int(time.time() * 1000)
    stamps = [now_ms - 7_200_000 + 100_000 * i for i in range(10)]  # 100 s apart
    producer = make_producer(settings)
    await producer.start()
    try:
        for i, stamp in enumerate(stamps):
            await producer.send_and_wait(t.requests, encode(Note(request_id=f"old-{i}")), key=f"old-{i}".encode(),
                                         partition=0, timestamp_ms=stamp)
        runner = ServiceRunner(settings, EchoHandler(settings))
        committer = KafkaOffsetsConsumer(make_consumer(settings, group_id=runner.group_id), settings)
        await committer.start()
        committer.assign([tp])
        await committer.commit({tp: OffsetAndMetadata(15, f"ts={stamps[9]}")})
        await committer.stop()
        for i in range(2):
            await producer.send_and_wait(t.requests, encode(Note(request_id=f"new-{i}")), key=f"new-{i}".encode(), partition=0)
    finally:
        await producer.stop()

    real_make_consumer = runtime.make_consumer
    monkeypatch.setattr(runtime, "make_consumer", lambda s, **o: KafkaOffsetsConsumer(real_make_consumer(s, **o), s))

    async def with_metadata(consumer: Any, partition: Any) -> Any:
        offset = await consumer.committed(partition)
        return None if offset is None else OffsetAndMetadata(offset, KafkaOffsetsConsumer.metadata.get(partition, ""))

    monkeypatch.setattr(runtime, "committed_metadata", with_metadata)
    running = asyncio.create_task(runner.run())
    try:
        async def resumed() -> bool:  # the stale 15 replaced by the end of what is there
            assert not running.done(), running.exception()
            return await _committed(settings, runner.group_id, tp) == 12

        await _wait_for(resumed, "committed at 12")
    finally:
        runner.request_stop()
        await asyncio.wait_for(running, 30)
    answered = sorted(decode(Payload, r.value).request_id for r in await _records(settings, t.examples))
    assert answered == ["new-0", "new-1", "old-9"]  # old-9 again (at least once), not old-0..old-8


async def test_the_status_ticker_waits_for_a_request_being_written_and_repeats_its_version():
    """No broker: the planner's ticker beside a step under way. It published a held-back status
    whatever the request's workers were doing, so a RUNNING could land after the step's COMPLETED;
    it now skips a request whose key lock is held, and its status carries the snapshot's version."""
    from tests.test_handlers import SETTINGS, FakeContext, by_topic, delivery

    class LockingContext(FakeContext):
        def __init__(self) -> None:
            super().__init__()
            self.locks: dict[str | None, asyncio.Lock] = {}

        def key_lock(self, key: str | None) -> asyncio.Lock:
            return self.locks.setdefault(key, asyncio.Lock())

    planner = PlannerHandler(SETTINGS.with_updates(status_interval_s=3600))
    ctx = planner.ctx = LockingContext()
    request = _request("req-tick")
    outputs = await planner.handle(request, delivery(SETTINGS.topics.requests, request))
    (snapshot,) = by_topic(outputs, SETTINGS.topics.planner_state)
    planner._dirty.add(request.request_id)
    async with ctx.key_lock(request.request_id):  # a step of the request is being handled
        await planner._flush_once()
        assert ctx.published == []
    await planner._flush_once()
    (status,) = by_topic(ctx.published, SETTINGS.topics.status)
    assert status.version == snapshot.version == 1 and status.state is RequestState.RUNNING

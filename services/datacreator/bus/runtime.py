"""The one consume -> process -> produce -> commit loop that every service runs.

Delivery is at-least-once: an offset is committed only after every message produced for it
has been acknowledged by the broker, and the offsets of a partition are committed in order even
when its records finish out of order. Whatever is redelivered after a crash carries the same
deterministic ids, so the consumers downstream drop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import signal
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.consumer.fetcher import ConsumerRecord
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnsupportedForMessageFormatError,
)
from aiokafka.structs import OffsetAndMetadata
from pydantic import BaseModel

from datacreator import metrics
from datacreator.bus.admin import TopicMismatch, ensure_topics
from datacreator.bus.codec import PoisonMessage, decode_key, decoder, encode, encode_key, request_id_in
from datacreator.bus.commit import commit
from datacreator.bus.ends import high_watermarks
from datacreator.bus.factory import client_overrides, make_consumer, make_producer
from datacreator.bus.fetchwait import ConsumerFetchWait, adaptive_fetch_wait
from datacreator.config import Settings
from datacreator.contracts import DeadLetter

log = logging.getLogger(__name__)

DLQ_VALUE_LIMIT = 10_000
# aiokafka retries a commit for as long as the broker answers "unknown topic": bound each try.
COMMIT_TIMEOUT_S = 10.0
TOPIC_CHECK_INTERVAL_S = 2.0
CLOSE_TIMEOUT_S = 5.0
# Records of one partition of a pipelined handler handled while earlier ones still await their
# acknowledgements: bounds what a partition holds in memory when the broker is slow or away.
PIPELINE_DEPTH = 32
# Producers a pipelined handler spreads its acknowledgements over when the client overrides ask for
# one record per batch (`max_batch_size: 1`): aiokafka keeps one produce request in flight per
# connection with one batch per partition, so one producer then moves one record of a partition per
# round trip; several move several. With batching (the default) one producer is enough.
PIPELINE_PRODUCERS = 4
# Outputs marked `latest` (a state snapshot: only the newest value of its key matters) of an ordered
# handler are held up to this long, or for this many records, and the newest of each key stands
# for all the records it covers: a record's offset is finished once the write that holds its state
# is acknowledged. One write per record made the planner's snapshots (tens of KB each, one per
# outcome) most of the bytes on the bus and of the embedded broker's memory.
HOLD_S = 0.5
HOLD_RECORDS = 64
# Records of one partition of an ordered handler handled together, their outputs acknowledged in one
# round (ServiceRunner._process); a group is what queued up while the one before was published.
GROUP_RECORDS = 64
# After a partition lost records below the committed offset, reading resumes this much before the
# time of the last record committed: record times come from the producers' clocks.
LOST_OFFSETS_CLOCK_MARGIN_MS = 60_000
# Produce errors that the same record meets on every try (Kafka's size limits, a bad topic name):
# retrying them would hold the partition for ever.
NON_RETRIABLE_PRODUCE = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,
    UnsupportedForMessageFormatError,
    CorruptRecordException,
)


_frozen = False


def freeze_startup_objects() -> None:
    """Move what the process holds once its first service is up (modules, models, settings, the
    handlers' tables) out of the cycle collector's reach, once per process. A full collection
    then scans only what came since: the longest pause of the services' event loop in an
    overhead-bound run went from 90-120 ms to 45 ms, the collector's time from 0.55-0.67 s to
    0.33-0.36 s per 6,000 examples. What was there at the start lives as long as the process."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


class UndeliverableOutput(Exception):
    """An output that can never be produced: it does not encode, or the broker refuses it for good.
    The input it answers goes to the DLQ with this reason."""


class Deferred:
    """A value built when its output is sent rather than when it is made: the snapshot of a state
    that the next steps may replace before it goes (`Output.latest`, HOLD_S), so that of the many
    made only the one sent is built.

    `build` runs on the event loop as the output is encoded, and reads the state as it is then.
    The runner encodes a held one only while no other task holds the lock of its key (`key_lock`),
    so a handler that changes that state only under the key's lock is read between its steps,
    never inside one (a step may wait in a thread). The key of such an output is written only under
    its lock, as every `latest` output is.
    """

    __slots__ = ("build", "kind")

    def __init__(self, model: type[BaseModel], build: Callable[[], BaseModel]) -> None:
        self.kind = model.__name__
        self.build = build


@dataclass(slots=True)
class Output:
    """One message to produce. Outputs of a later `stage` are sent only once every output of the
    earlier stages is acknowledged: Kafka orders nothing between topics (or partitions), so an
    output that announces others (an outcome counting its examples) must wait for them."""

    topic: str
    key: str | None
    value: BaseModel | Deferred | None  # None: a tombstone (deletes the key from a compacted topic)
    stage: int = 0
    # Only the newest value of (topic, key) matters (a snapshot on a compacted topic): an ordered
    # handler's runner may send a later one of the same key in its place (HOLD_S).
    latest: bool = False


def value_of(output: Output) -> BaseModel | None:
    """The message an output sends (a Deferred one built now)."""
    return output.value.build() if isinstance(output.value, Deferred) else output.value


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a message came from: what a handler may know of the bus besides the message itself.

    `value` keeps the raw bytes, so a dead letter can carry the message as it arrived.
    """

    topic: str
    partition: int
    offset: int
    key: str | None = None
    value: bytes | None = field(default=None, repr=False, compare=False)


def dead_letter(
    delivery: Delivery,
    reason: Exception | str,
    *,
    service: str,
    topic: str,
    attempts: int = 1,
    error_type: str | None = None,
) -> Output:
    """The DLQ message for one delivery: its origin, its value (cut at DLQ_VALUE_LIMIT) and the error."""
    error = str(reason)[:2000] or type(reason).__name__
    letter = DeadLetter(
        service=service,
        source_topic=delivery.topic,
        partition=delivery.partition,
        offset=delivery.offset,
        key=delivery.key,
        value=(delivery.value or b"")[:DLQ_VALUE_LIMIT].decode("utf-8", "replace"),
        error=error,
        error_type=error_type or type(reason).__name__,
        attempts=attempts,
    )
    return Output(topic, delivery.key, letter)


class Context(Protocol):
    """What a handler may use besides its return value."""

    settings: Settings

    async def publish(self, outputs: Iterable[Output]) -> None: ...

    def key_lock(self, key: str | None) -> asyncio.Lock: ...
    def submit(self, topic: str, partition: int, job: Callable[[], Awaitable[list[Output]]]) -> bool: ...

    def dead_letter(
        self, delivery: Delivery, reason: Exception | str, *, attempts: int = 1, error_type: str | None = None
    ) -> Output: ...


class Handler(Protocol):
    """A service's logic behind the loop; it never sees offsets, commits or bytes.

    `inputs` maps each topic it consumes to the model its messages decode to; the runner decodes,
    sends what does not decode to the DLQ (plus whatever `on_poison` adds) and calls `handle`
    with the model. Partitions are plain numbers: the topics of one service share partition
    numbers (all keyed by request id), so a number stands for that partition of every input.
    """

    name: str
    inputs: dict[str, Any]
    ordered: bool  # True: one record at a time per partition (stateful services)
    # With `ordered`: records are still handled one at a time and in order, but the next one is
    # handled while the outputs of the previous ones are being acknowledged (see ServiceRunner).
    pipelined: bool

    async def start(self, ctx: Context) -> None: ...

    async def stop(self) -> None: ...

    async def handle(self, message: Any, delivery: Delivery) -> list[Output]: ...

    def on_poison(self, delivery: Delivery, error: PoisonMessage) -> list[Output]: ...

    def on_dead_letter(self, message: Any, delivery: Delivery, reason: Exception) -> list[Output]: ...

    async def on_assigned(self, partitions: set[int]) -> None: ...

    async def on_revoked(self, partitions: set[int]) -> None: ...


class BaseHandler:
    name = "service"
    inputs: dict[str, Any] = {}
    ordered = False
    pipelined = False

    @property
    def topics(self) -> list[str]:
        return list(self.inputs)

    async def start(self, ctx: Context) -> None:
        self.ctx = ctx

    async def stop(self) -> None:
        return None

    def on_poison(self, delivery: Delivery, error: PoisonMessage) -> list[Output]:
        """Outputs besides the dead letter for a message that does not decode (none by default)."""
        return []

    def on_dead_letter(self, message: Any, delivery: Delivery, reason: Exception) -> list[Output]:
        """Outputs besides the dead letter for a decoded message the service could not process
        (none by default): where a message is owed an answer, the answer that says it failed."""
        return []

    async def on_assigned(self, partitions: set[int]) -> None:
        return None

    async def on_revoked(self, partitions: set[int]) -> None:
        return None


class _PartitionTrack:
    """Offsets of one partition in arrival order; commits the longest finished prefix."""

    __slots__ = ("order", "finished", "committed", "queue", "worker", "stamps", "stamp", "acks", "window", "last_ack",
                 "give_ups_queued", "give_ups_heard")

    def __init__(self) -> None:
        self.order: deque[int] = deque()
        self.finished: set[int] = set()
        self.committed: int | None = None  # next offset to read, as last committed
        self.queue: asyncio.Queue[Any] | None = None
        self.worker: asyncio.Task[None] | None = None
        self.stamps: dict[int, int] = {}  # offset -> record timestamp (ms), until committable
        self.stamp: int | None = None  # timestamp of the last record of the committable prefix
        self.acks: set[asyncio.Task[None]] = set()  # pipelined handlers: publishes under way
        self.window: asyncio.Semaphore | None = None  # pipelined handlers: PIPELINE_DEPTH
        # pipelined handlers: set once the latest record's earlier stages are acknowledged, or its
        # give-up is queued; the next record's last stage waits for it
        self.last_ack: asyncio.Future[None] | None = None
        # pipelined handlers: give-ups queued for the worker, and those the handler has heard of. A
        # record handled while fewer were heard than are now queued saw a state that is not on the
        # topic, and is handled again.
        self.give_ups_queued = 0
        self.give_ups_heard = 0

    def add(self, offset: int, timestamp: int | None = None) -> None:
        self.order.append(offset)
        if timestamp is not None and timestamp >= 0:
            self.stamps[offset] = timestamp

    def finish(self, offset: int) -> None:
        self.finished.add(offset)

    def committable(self) -> int | None:
        position = None
        while self.order and self.order[0] in self.finished:
            offset = self.order.popleft()
            self.finished.discard(offset)
            position = offset + 1
            self.stamp = self.stamps.pop(offset, self.stamp)
        return position

    @property
    def pending(self) -> int:
        return len(self.order)


class _KeyLock(asyncio.Lock):
    """asyncio.Lock that knows the task holding it: a held Deferred output is built by its key's
    holder or while no one holds it (see Deferred)."""

    owner: asyncio.Task[Any] | None = None

    async def acquire(self) -> Literal[True]:
        await super().acquire()
        self.owner = asyncio.current_task()
        return True

    def release(self) -> None:
        self.owner = None
        super().release()


@dataclass(slots=True)
class _Held:
    """A held `latest` output and the records whose state it carries (finished once it is acknowledged)."""

    output: Output
    waiters: list[tuple[_PartitionTrack, int]]


@dataclass
class RunnerState:
    ready: bool = False
    running: bool = False
    assigned: set[TopicPartition] = field(default_factory=set)


class ServiceRunner:
    def __init__(
        self,
        settings: Settings,
        handler: Handler,
        *,
        group_id: str | None = None,
        max_in_flight: int | None = None,
        commit_interval_s: float = 0.2,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.group_id = group_id or f"datacreator-{handler.name}"
        self.max_in_flight = max_in_flight or settings.runtime.max_in_flight
        self.commit_interval_s = commit_interval_s
        self.state = RunnerState()
        self._tracks: dict[TopicPartition, _PartitionTrack] = {}
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._retries: set[asyncio.Task[None]] = set()  # partitions whose take-over is tried again
        self._stopping = asyncio.Event()
        self._paused = False
        self._consumer: AIOKafkaConsumer | None = None
        self.fetch_wait: ConsumerFetchWait | None = None  # short while records flow: bus/fetchwait.py
        self._producer: AIOKafkaProducer | None = None
        self._ack_producers: list[AIOKafkaProducer] = []  # pipelined handlers: see PIPELINE_PRODUCERS
        self._next_ack_producer = 0
        self._commit_lock = asyncio.Lock()
        self._decoders = {topic: decoder(model) for topic, model in handler.inputs.items()}
        self._next_topic_check = 0.0
        self._fatal: Exception | None = None
        self._key_locks: weakref.WeakValueDictionary[str | None, _KeyLock] = weakref.WeakValueDictionary()
        self._held: dict[tuple[str, str | None], _Held] = {}  # ordered handlers: see HOLD_S
        self._held_since = 0.0
        self._held_records = 0
        self._flushing: set[tuple[str, str | None]] = set()
        self._flush_lock = asyncio.Lock()

    def key_lock(self, key: str | None) -> asyncio.Lock:
        """The lock an ordered handler's records of one key are handled and published under.

        A request's inputs arrive on several topics (the planner's requests and outcomes), each
        partition with its own worker: without it, a cancel and an outcome of one request are
        handled at once and their snapshots land in either order, and compaction keeps the
        later offset, not the later state. Writers outside the workers (status tickers) take it too.
        """
        lock = self._key_locks.get(key)
        if lock is None:
            lock = self._key_locks[key] = _KeyLock()
        return lock

    def _in_a_step(self, output: Output) -> bool:
        """Whether a Deferred output's key is held by another task: its state may be mid-step."""
        if not isinstance(output.value, Deferred):
            return False
        lock = self._key_locks.get(output.key)
        return lock is not None and lock.locked() and lock.owner is not asyncio.current_task()

    # -- what handlers may call -------------------------------------------------------------

    async def publish(self, outputs: Iterable[Output], producer: AIOKafkaProducer | None = None) -> None:
        """Produce and wait for every acknowledgement; retries while the broker is away.

        A held output (HOLD_S) of a key written here goes out first: it is the older value.

        Every output is encoded before any is sent, so one that cannot be encoded sends nothing;
        that, and a record the broker refuses for good, raise UndeliverableOutput. Stages go out
        one after the other (see Output.stage); a retry sends again only the stages not yet
        acknowledged.
        """
        outputs = list(outputs)
        if (self._held or self._flushing) and any(
                (o.topic, o.key) in self._held or (o.topic, o.key) in self._flushing for o in outputs):
            await self._flush_held()
        await self._publish(outputs, producer)

    async def _publish(self, outputs: list[Output], producer: AIOKafkaProducer | None = None) -> None:
        producer = producer or self._producer
        assert producer is not None
        encoded = [(o, _encode_output(o), encode_key(o.key)) for o in outputs]
        if not encoded:
            return
        stages = [[e for e in encoded if e[0].stage == n] for n in sorted({e[0].stage for e in encoded})]
        delay = 0.2
        while stages:
            try:
                await self._send_acknowledged(stages[0], producer)
                stages.pop(0)
            except KafkaError as exc:
                if self._stopping.is_set() and delay > 5:
                    raise
                log.warning("%s: produce failed (%s); retrying in %.1fs", self.handler.name, type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        for output, _, _ in encoded:
            metrics.messages_produced.labels(self.handler.name, output.topic).inc()

    async def _send_acknowledged(self, encoded: list[tuple[Output, bytes | None, bytes | None]], producer: AIOKafkaProducer) -> None:
        futures = []
        for output, value, key in encoded:
            try:
                futures.append(await producer.send(output.topic, value, key=key))
            except NON_RETRIABLE_PRODUCE as exc:
                raise _refused(output, value, exc) from exc
        results = await asyncio.gather(*futures, return_exceptions=True)
        for (output, value, _), result in zip(encoded, results):
            if isinstance(result, NON_RETRIABLE_PRODUCE):
                raise _refused(output, value, result) from result
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _hold(self, outputs: list[Output], track: _PartitionTrack, offset: int) -> None:
        """Keep `outputs` (all `latest`) as the newest values of their keys; the record at `offset`
        is finished when the held value of its last key is acknowledged (called under the key lock)."""
        if not self._held:
            self._held_since = time.monotonic()
        for i, output in enumerate(outputs):
            slot = (output.topic, output.key)
            previous = self._held.pop(slot, None)
            waiters = previous.waiters if previous is not None else []
            if i == len(outputs) - 1:
                waiters.append((track, offset))
            self._held[slot] = _Held(output, waiters)
        self._held_records += 1

    def _hold_due(self) -> bool:
        return bool(self._held) and (self._held_records >= HOLD_RECORDS or time.monotonic() - self._held_since >= HOLD_S)

    async def _flush_held(self) -> None:
        """Send the held outputs and finish the records they answer. Not sent (the runner is
        stopping): those records stay unfinished, uncommitted, and are read again. A Deferred one
        whose key another task holds (a step of it under way) stays held: that step holds a newer
        one in its place when it ends, and the next flush sends it."""
        async with self._flush_lock:
            held = {slot: entry for slot, entry in self._held.items() if not self._in_a_step(entry.output)}
            if not held:
                return
            self._held = {slot: entry for slot, entry in self._held.items() if slot not in held}
            self._held_records = sum(len(entry.waiters) for entry in self._held.values())
            self._flushing = set(held)
            try:
                await self._publish([h.output for h in held.values()])
            except UndeliverableOutput as exc:  # a state that cannot be written: as a refused output's input
                log.error("%s: held outputs refused (%s); their records are given up", self.handler.name, exc)
            finally:
                self._flushing = set()
            for entry in held.values():
                for track, offset in entry.waiters:
                    track.finish(offset)

    def submit(self, topic: str, partition: int, job: Callable[[], Awaitable[list[Output]]]) -> bool:
        """Run `job` on the worker of one partition of an ordered handler, between its records, and
        publish what it returns; False when this member does not hold that partition. A handler's
        own timers go through here, so one request's state has one writer at a time."""
        tp = TopicPartition(topic, partition)
        track = self._tracks.get(tp)
        if track is None or not self.handler.ordered or self._stopping.is_set():
            return False
        self._ensure_worker(tp, track)
        assert track.queue is not None
        track.queue.put_nowait(job)
        return True

    # -- the loop ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        name = self.handler.name
        self._producer = make_producer(self.settings)
        self._consumer = make_consumer(
            self.settings,
            group_id=self.group_id,
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_interval_ms=600_000,
            session_timeout_ms=self.settings.kafka.session_timeout_ms,
            heartbeat_interval_ms=self.settings.kafka.heartbeat_interval_ms,
            fetch_max_bytes=self.settings.kafka.max_message_bytes * 8,
        )
        await _retry_start(self._producer.start, f"{name} producer")
        self._ack_producers = [self._producer]
        if self.handler.pipelined and _one_record_per_batch(self.settings):
            for _ in range(PIPELINE_PRODUCERS - 1):
                extra = make_producer(self.settings)
                self._ack_producers.append(extra)  # before start: stopped in any case
                await _retry_start(extra.start, f"{name} producer")
        self._consumer.subscribe(list(self.handler.inputs), listener=_Listener(self))
        await _retry_start(self._consumer.start, f"{name} consumer")
        self.fetch_wait = adaptive_fetch_wait(self.settings, self._consumer)
        await self.handler.start(self)
        freeze_startup_objects()
        self.state.running = True
        metrics.service_up.labels(name).set(1)
        committer = asyncio.create_task(self._commit_loop(), name=f"{name}-commit")
        log.info("%s: consuming %s as group %s", name, ", ".join(self.handler.inputs), self.group_id)
        try:
            while not self._stopping.is_set():
                self._apply_backpressure()
                try:
                    batches = await self._consumer.getmany(timeout_ms=100, max_records=self.max_in_flight)
                except KafkaError as exc:
                    log.warning("%s: fetch failed (%s); retrying", name, type(exc).__name__)
                    await asyncio.sleep(0.5)
                    continue
                if self.fetch_wait is not None:
                    self.fetch_wait.observe(bool(batches))
                for tp, records in batches.items():
                    track = self._tracks.get(tp)
                    if track is None:
                        if tp in self._consumer.assignment():
                            # Assigned, but the handler is still taking it over (aiokafka hands out
                            # records while on_partitions_assigned runs): read them again later.
                            self._consumer.seek(tp, records[0].offset)
                        continue  # else revoked while the fetch was under way: the new owner reads it
                    for record in records:
                        metrics.messages_consumed.labels(name, tp.topic).inc()
                        self._dispatch(tp, track, record)
        finally:
            self.state.ready = False
            metrics.service_up.labels(name).set(0)
            await self._cancel_retries()
            await self._drain(self.settings.runtime.shutdown_timeout_s)
            for _ in range(50):  # asyncio.wait_for in 3.11 can swallow a cancellation: ask again
                committer.cancel()
                if (await asyncio.wait({committer}, timeout=0.2))[0]:
                    break
            with contextlib.suppress(Exception):
                await self._commit()
            await self.handler.stop()
            # Bounded: after the broker lost its groups or topics, leaving or flushing can wait for ever.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._consumer.stop(), CLOSE_TIMEOUT_S)
            for producer in self._ack_producers or [self._producer]:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), CLOSE_TIMEOUT_S)
            self._forget_lag(list(self._tracks))
            self.state.running = False
            log.info("%s: stopped", name)
        if self._fatal is not None:
            raise self._fatal

    def _dispatch(self, tp: TopicPartition, track: _PartitionTrack, record: ConsumerRecord) -> None:
        track.add(record.offset, getattr(record, "timestamp", None))
        self._in_flight += 1
        metrics.in_flight.labels(self.handler.name).set(self._in_flight)
        if self.handler.ordered:
            self._ensure_worker(tp, track)
            assert track.queue is not None
            track.queue.put_nowait(record)
        else:
            task = asyncio.create_task(self._process(tp, track, [record]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _ensure_worker(self, tp: TopicPartition, track: _PartitionTrack) -> None:
        if track.queue is None:
            track.queue = asyncio.Queue()
            track.window = asyncio.Semaphore(PIPELINE_DEPTH)
            track.worker = asyncio.create_task(self._partition_worker(tp, track))

    async def _partition_worker(self, tp: TopicPartition, track: _PartitionTrack) -> None:
        assert track.queue is not None
        job: Any = None  # a job met while gathering records: it runs after them, in queue order
        while True:
            if job is None:
                item = await track.queue.get()
            else:
                item, job = job, None
            if callable(item):
                await self._run_job(tp, item)
            elif self.handler.pipelined:
                await self._process_pipelined(tp, track, item)
            else:
                records = [item]
                while len(records) < GROUP_RECORDS and not track.queue.empty():
                    queued = track.queue.get_nowait()
                    if callable(queued):
                        job = queued
                        break
                    records.append(queued)
                await self._process(tp, track, records)
            if self._hold_due():
                await self._flush_held()

    async def _run_job(self, tp: TopicPartition, job: Callable[[], Awaitable[list[Output]]]) -> None:
        try:
            await self.publish(await job())
        except asyncio.CancelledError:
            raise
        except Exception:  # a timer's step is taken again at its next tick
            log.exception("%s: a job on %s[%d] failed", self.handler.name, tp.topic, tp.partition)

    async def _process(self, tp: TopicPartition, track: _PartitionTrack, records: list[ConsumerRecord]) -> None:
        """Handle records of one partition in order, then publish all their outputs at once.

        An ordered handler gets every record that queued up while the ones before were published:
        they are handled one after the other as before, and wait for one round of acknowledgements
        together instead of one each (the planner, one outcome at a time, spent 92% of its time
        waiting for the acknowledgement of each next task). The keys of the group stay locked
        until their outputs are acknowledged. When one record's output is refused for good, each
        record's outputs go again on their own and only that record is given up: what went out
        twice carries the same ids, as a redelivery would.
        """
        name = self.handler.name
        started = time.perf_counter()
        ordered = self.handler.ordered
        handled: list[tuple[ConsumerRecord, Delivery, Any]] = []
        sent: list[list[Output]] = []  # per record, what goes out now
        held: dict[int, list[Output]] = {}  # per record offset, its `latest` outputs, held
        deliveries = [_delivery_of(record) for record in records]
        try:
            async with contextlib.AsyncExitStack() as locks:
                # Handled and acknowledged before the next record of its key. All of a group's keys
                # are taken first and in one order: two workers' groups (a request's requests and
                # outcomes partitions) never hold one key each while waiting for the other's.
                for key in sorted({d.key for d in deliveries} if ordered else (), key=lambda k: (k is not None, k or "")):
                    await locks.enter_async_context(self.key_lock(key))
                for record, delivery in zip(records, deliveries):
                    outputs, message = await self._handle(record, delivery)
                    handled.append((record, delivery, message))
                    kept = [o for o in outputs if o.latest] if ordered else []
                    if kept:
                        held[record.offset] = kept
                    sent.append([o for o in outputs if not o.latest] if kept else outputs)
                try:
                    await self.publish([o for outputs in sent for o in outputs])
                except UndeliverableOutput as exc:
                    if len(handled) == 1:
                        await self._refused_record(tp, *handled[0], exc)
                    else:
                        for (record, delivery, message), outputs in zip(handled, sent):
                            try:
                                await self.publish(outputs)
                            except UndeliverableOutput as refused:
                                await self._refused_record(tp, record, delivery, message, refused)
                for record, _, _ in handled:
                    if record.offset in held:  # finished when the held state is acknowledged
                        self._hold(held[record.offset], track, record.offset)
            for record, _, _ in handled:
                if record.offset not in held:
                    track.finish(record.offset)
        except asyncio.CancelledError:
            raise
        except Exception:  # publishing gave up during shutdown: left uncommitted, they are redelivered
            log.exception("%s: could not finish %s[%d]@%d..%d", name, tp.topic, tp.partition, records[0].offset,
                          records[-1].offset)
        finally:
            for _ in records:
                self._record_done(tp, started)

    async def _refused_record(self, tp: TopicPartition, record: ConsumerRecord, delivery: Delivery, message: Any,
                              exc: UndeliverableOutput) -> None:
        self._count_refused(tp, record.offset, exc)
        await self._publish_give_up(message, delivery, exc)

    def _count_refused(self, tp: TopicPartition, offset: int, exc: UndeliverableOutput) -> None:
        """A record whose output the broker refuses for good: counted, and said, as it goes to the DLQ."""
        metrics.processing_errors.labels(self.handler.name, tp.topic).inc()
        log.error("%s: %s[%d]@%d to the DLQ: %s", self.handler.name, tp.topic, tp.partition, offset, exc)

    async def _process_pipelined(self, tp: TopicPartition, track: _PartitionTrack, record: ConsumerRecord) -> None:
        """Handle one record in order, then acknowledge its outputs in the background.

        The next record of the partition is handled while these outputs travel, so a partition's
        throughput is no longer one round trip to the broker (or more: stages) per record. What
        still holds: records are handled one at a time and in offset order (the handler's state
        sees them as before); an offset is finished, and so committable, only once all its outputs
        are acknowledged; commits follow offset order (_PartitionTrack). Outputs of consecutive
        records may be acknowledged in either order, which no consumer relies on: each message
        carries its own ids. A record whose outputs are refused for good is answered on the
        worker, between records, because the handler's `on_dead_letter` may change its state.
        """
        name = self.handler.name
        started = time.perf_counter()
        delivery = _delivery_of(record)
        assert track.window is not None
        handed_off = False
        try:
            await track.window.acquire()
            try:
                async with self.key_lock(delivery.key):  # handled before the next record of its key
                    seen = track.give_ups_heard
                    outputs, message = await self._handle(record, delivery)
                previous, track.last_ack = track.last_ack, asyncio.get_running_loop().create_future()
                ack = asyncio.create_task(self._acknowledge(tp, track, record, delivery, outputs, message, started,
                                                            seen, previous, track.last_ack))
                handed_off = True
            finally:
                if not handed_off:
                    track.window.release()
            track.acks.add(ack)
            ack.add_done_callback(track.acks.discard)
        except asyncio.CancelledError:
            raise
        except Exception:  # left uncommitted: it is redelivered
            log.exception("%s: could not handle %s[%d]@%d", name, tp.topic, tp.partition, record.offset)
        finally:
            if not handed_off:
                self._record_done(tp, started)

    async def _acknowledge(self, tp: TopicPartition, track: _PartitionTrack, record: ConsumerRecord, delivery: Delivery,
                           outputs: list[Output], message: Any, started: float, seen: int,
                           previous: asyncio.Future[None] | None, done: asyncio.Future[None]) -> None:
        """Publish one record's outputs; its last stage (an outcome that reports the others) only
        once the record before it got its earlier stages out or was given up. When a record of the
        partition was given up and the handler had not heard of it when it handled this one (`seen`
        give-ups heard then, fewer than are now queued), this one may have seen a state that is not
        on the topic: it is handled again, on the worker, after the handler has heard of the
        give-up, as a redelivery would be.

        `done` is set as soon as this record's earlier stages are acknowledged, before its own last
        stage goes, so that an outcome waits for the examples before it and not for every outcome
        before it: one acknowledgement per round trip per partition was the curator's ceiling."""
        name = self.handler.name
        assert track.window is not None
        window = track.window
        holding = True
        producer = self._ack_producers[self._next_ack_producer % len(self._ack_producers)] if self._ack_producers else None
        self._next_ack_producer += 1
        last = max((o.stage for o in outputs), default=0)

        def on_worker(step: Callable[[], Awaitable[None]]) -> asyncio.Future[None]:
            nonlocal holding
            answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def job() -> list[Output]:
                try:
                    await step()
                    answered.set_result(None)
                except BaseException as error:
                    answered.set_exception(error)
                    raise
                return []

            assert track.queue is not None
            if holding:  # the worker may be waiting for a place in the window: give this one up first
                window.release()
                holding = False
            track.queue.put_nowait(job)
            return answered

        async def give_up(message: Any, exc: Exception) -> None:  # on the worker
            track.give_ups_heard += 1
            await self._publish_give_up(message, delivery, exc)

        async def again() -> None:
            outputs, message = await self._handle(record, delivery)
            try:
                await self.publish(outputs)
            except UndeliverableOutput as exc:
                track.give_ups_queued += 1
                await give_up(message, exc)

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        try:
            try:
                await self.publish([o for o in outputs if o.stage < last], producer)
                if previous is not None:
                    await previous
                if track.give_ups_queued != seen:
                    answered = on_worker(again)
                    settle()  # what comes after is handled again too, after this
                    await answered
                else:
                    settle()
                    await self.publish([o for o in outputs if o.stage == last], producer)
            except UndeliverableOutput as exc:
                self._count_refused(tp, record.offset, exc)
                track.give_ups_queued += 1
                refused = exc
                answered = on_worker(lambda: give_up(message, refused))
                settle()
                await answered
            track.finish(record.offset)
            settle()
        except Exception:  # publishing gave up during shutdown: leave it uncommitted, it is redelivered
            log.exception("%s: could not finish %s[%d]@%d", name, tp.topic, tp.partition, record.offset)
        finally:
            if not done.done():
                done.cancel()  # not settled: what comes after is not finished either, it is redelivered
            if holding:
                window.release()
            self._record_done(tp, started)

    async def _publish_give_up(self, message: Any, delivery: Delivery, exc: Exception) -> None:
        answers = self._give_up(message, delivery, exc)
        try:
            await self.publish(answers)
        except UndeliverableOutput:  # the handler's answer cannot go either: the letter alone
            await self.publish(answers[:1])

    def _record_done(self, tp: TopicPartition, started: float) -> None:
        self._in_flight -= 1
        metrics.in_flight.labels(self.handler.name).set(self._in_flight)
        metrics.processing_seconds.labels(self.handler.name, tp.topic).observe(time.perf_counter() - started)

    async def _handle_with_retries(self, record: ConsumerRecord, delivery: Delivery | None = None) -> list[Output]:
        return (await self._handle(record, delivery or _delivery_of(record)))[0]

    async def _handle(self, record: ConsumerRecord, delivery: Delivery) -> tuple[list[Output], Any]:
        """The outputs for one record, and the message it decoded to (None when it did not)."""
        name = self.handler.name
        try:
            message = self._decoders[record.topic](record.value, self.settings.kafka.max_message_bytes)
        except PoisonMessage as exc:
            outputs = [self._failed(delivery, exc)]
            try:
                outputs += self.handler.on_poison(delivery, exc)
            except Exception:  # the dead letter still goes out: the partition must keep moving
                log.exception("%s: on_poison failed for %s[%d]@%d", name, record.topic, record.partition, record.offset)
            return outputs, None
        request_id = request_id_in(message)
        if request_id is not None and delivery.key != request_id:
            # Partitions follow the key: a message keyed otherwise reaches a member that may not
            # hold its request (and, for the planner, could act on another request's behalf).
            # Nothing else is answered for it: its request is not this member's to answer.
            return [self._failed(delivery, PoisonMessage(
                f"key {delivery.key!r} is not the message's request_id {request_id!r}"))], None
        attempts = self.settings.runtime.message_attempts
        for attempt in range(1, attempts + 1):
            try:
                return await self.handler.handle(message, delivery), message
            except (PoisonMessage, UndeliverableOutput) as exc:  # the same on every attempt
                return self._give_up(message, delivery, exc, attempt), message
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.processing_errors.labels(name, record.topic).inc()
                if attempt == attempts:
                    log.error("%s: %s[%d]@%d failed %d times, to the DLQ: %s", name, record.topic,
                              record.partition, record.offset, attempt, type(exc).__name__)
                    return self._give_up(message, delivery, exc, attempt), message
                log.warning("%s: attempt %d at %s[%d]@%d failed: %r", name, attempt, record.topic,
                            record.partition, record.offset, exc)
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _give_up(self, message: Any, delivery: Delivery, exc: Exception, attempts: int = 1) -> list[Output]:
        """The dead letter, plus what the handler answers for a message it could not process."""
        outputs = [self._failed(delivery, exc, attempts)]
        if message is not None:
            try:
                outputs += self.handler.on_dead_letter(message, delivery, exc)
            except Exception:  # the dead letter still goes out: the partition must keep moving
                log.exception("%s: on_dead_letter failed for %s[%d]@%d", self.handler.name, delivery.topic,
                              delivery.partition, delivery.offset)
        return outputs

    def _failed(self, delivery: Delivery, exc: Exception, attempts: int = 1) -> Output:
        """A message the service could not process: counted (alerts watch it) and dead-lettered."""
        metrics.messages_dead_lettered.labels(self.handler.name, delivery.topic).inc()
        return self.dead_letter(delivery, exc, attempts=attempts)

    def dead_letter(
        self, delivery: Delivery, reason: Exception | str, *, attempts: int = 1, error_type: str | None = None
    ) -> Output:
        return dead_letter(delivery, reason, service=self.handler.name, topic=self.settings.topics.dlq,
                           attempts=attempts, error_type=error_type)

    def _apply_backpressure(self) -> None:
        assert self._consumer is not None
        assigned = list(self._tracks)
        if not self._paused and self._in_flight >= self.max_in_flight:
            self._consumer.pause(*assigned)
            self._paused = True
        elif self._paused and self._in_flight <= self.max_in_flight // 2:
            self._consumer.resume(*assigned)
            self._paused = False

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.commit_interval_s)
            try:
                if self._hold_due():  # a partition gone quiet: its held state goes out on time
                    await self._flush_held()
                await self._commit()
                await self._update_lag()
                await self._check_topics(failed=False)
            except KafkaError as exc:
                log.warning("%s: commit failed (%s); retrying", self.handler.name, type(exc).__name__)
                await self._check_topics(failed=True)

    async def _check_topics(self, failed: bool) -> None:
        """Create the topics again when the broker has lost them (e.g. restarted with empty storage).

        Runs after a failed commit, or when the consumer's metadata no longer lists a subscribed
        topic; at most every TOPIC_CHECK_INTERVAL_S. The consumer then rejoins and reads the new
        partitions from their start.
        """
        assert self._consumer is not None
        now = time.monotonic()
        if now < self._next_topic_check:
            return
        missing = [t for t in self.handler.inputs if not self._consumer.partitions_for_topic(t)]
        if not failed and not missing:
            return
        self._next_topic_check = now + TOPIC_CHECK_INTERVAL_S
        if missing:
            log.warning("%s: topics %s are gone from the broker; creating them again", self.handler.name, ", ".join(missing))
        try:
            await ensure_topics(self.settings, timeout_s=5.0)
        except TopicMismatch as exc:
            # Co-partitioning is broken: carrying on would send a request's messages to members
            # that do not hold it. Stop, and let `run` raise the reason.
            log.error("%s: %s", self.handler.name, exc)
            self._fatal = exc
            self._stopping.set()
        except Exception as exc:  # the broker is still away: the next failure tries again
            log.warning("%s: cannot check the topics yet (%s)", self.handler.name, type(exc).__name__)

    async def _commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        assert self._consumer is not None
        async with self._commit_lock:
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            for tp in list(partitions if partitions is not None else self._tracks):
                track = self._tracks.get(tp)
                if track is None:
                    continue
                position = track.committable()
                if position is not None and position != track.committed:
                    # The last record's time travels with the offset: a partition that loses records
                    # below it (unclean leader election) resumes from that time, not from its start.
                    offsets[tp] = OffsetAndMetadata(position, "" if track.stamp is None else f"ts={track.stamp}")
            if offsets:
                await commit(self._consumer, offsets, COMMIT_TIMEOUT_S)
                for tp, meta in offsets.items():
                    if tp in self._tracks:
                        self._tracks[tp].committed = meta.offset

    async def _update_lag(self) -> None:
        assert self._consumer is not None
        for tp in list(self._tracks):
            with contextlib.suppress(Exception):
                highwater = self._consumer.highwater(tp)
                position = await asyncio.wait_for(self._consumer.position(tp), 1.0)
                track = self._tracks.get(tp)
                if track is not None and track.committed is not None and position < track.committed:
                    await self._restart_partition(tp, position)
                    continue
                if highwater is not None and tp in self._tracks:
                    metrics.consumer_lag.labels(self.handler.name, tp.topic, str(tp.partition)).set(max(highwater - position, 0))

    def _forget_lag(self, partitions: Iterable[TopicPartition]) -> None:
        # A partition's new owner reports its lag; a frozen value here would be counted twice.
        for tp in partitions:
            with contextlib.suppress(KeyError):
                metrics.consumer_lag.remove(self.handler.name, tp.topic, str(tp.partition))

    async def _drain(self, timeout_s: float, partitions: set[TopicPartition] | None = None) -> None:
        """Wait (bounded) for in-flight records, of some partitions or all, to finish."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._held:
                try:
                    await asyncio.wait_for(self._flush_held(), max(0.1, deadline - time.monotonic()))
                except (KafkaError, TimeoutError) as exc:  # left unfinished: read again by the next owner
                    log.warning("%s: held outputs not sent (%s)", self.handler.name, type(exc).__name__)
            tracks = [t for tp, t in self._tracks.items() if partitions is None or tp in partitions]
            if all(t.pending == len(t.finished) for t in tracks):
                break
            await asyncio.sleep(0.05)
        if partitions is None:
            for task in list(self._tasks):
                task.cancel()
        for tp, track in list(self._tracks.items()):
            if (partitions is None or tp in partitions) and track.worker is not None:
                track.worker.cancel()
                for ack in list(track.acks):
                    ack.cancel()

    # -- rebalancing ------------------------------------------------------------------------

    async def _cancel_retries(self) -> None:
        for retry in list(self._retries):
            retry.cancel()
        if self._retries:
            await asyncio.wait(set(self._retries))

    async def _restart_partition(self, tp: TopicPartition, position: int) -> None:
        """The consumer's position fell below what was committed: the broker lost the partition's
        data and the consumer was reset to its new start. Handle it as the partition given up and
        taken again, so the handler rebuilds its state from what the broker has now."""
        assert self._consumer is not None
        old = self._tracks.get(tp)
        log.warning("%s: %s[%d] went back from offset %s to %d: the broker lost its records; starting it over",
                    self.handler.name, tp.topic, tp.partition, old.committed if old else None, position)
        if old is not None:
            if old.worker is not None:
                old.worker.cancel()
            for ack in list(old.acks):
                ack.cancel()
            self._in_flight -= _queued_records(old)
        self._tracks.pop(tp, None)
        self._consumer.seek(tp, position)  # records fetched meanwhile went to the old track: read them again
        await self.handler.on_revoked({tp.partition})
        await self._take_over({tp})

    async def _skip_lost_offsets(self, assigned: set[TopicPartition]) -> None:
        """A committed offset past the end of its partition was committed to a log the broker has
        since lost part of (an unclean leader election) or all of (the topic was created again and
        an old commit landed after): resume at the first record not older than the last one
        committed, or at the earliest offset the partition still has, never at 0 blindly."""
        assert self._consumer is not None
        if not assigned:
            return
        try:
            ends = await asyncio.wait_for(self._consumer.end_offsets(list(assigned)), COMMIT_TIMEOUT_S)
            for tp in assigned:
                committed = await asyncio.wait_for(committed_metadata(self._consumer, tp), COMMIT_TIMEOUT_S)
                if committed is None or committed.offset <= ends.get(tp, committed.offset):
                    continue
                # A listed end may fall short of a last batch (bus.ends): confirm it before calling records lost.
                ends.update(await asyncio.wait_for(high_watermarks(self.settings, {tp: ends[tp]}), COMMIT_TIMEOUT_S))
                if committed.offset > ends[tp]:
                    target, why = await self._resume_offset(tp, committed, ends[tp])
                    log.warning("%s: %s[%d] has offset %d committed but ends at %d: the broker lost records; "
                                "reading it from %d (%s)", self.handler.name, tp.topic, tp.partition,
                                committed.offset, ends[tp], target, why)
                    self._consumer.seek(tp, target)
        except (TimeoutError, KafkaError) as exc:
            log.warning("%s: cannot compare committed and end offsets (%s)", self.handler.name, type(exc).__name__)

    async def _resume_offset(self, tp: TopicPartition, committed: OffsetAndMetadata, end: int) -> tuple[int, str]:
        assert self._consumer is not None
        begin = (await asyncio.wait_for(self._consumer.beginning_offsets([tp]), COMMIT_TIMEOUT_S))[tp]
        stamp = _stamp_of(committed.metadata)
        if stamp is None:
            return begin, "no record time committed: its earliest offset"
        since = max(stamp - LOST_OFFSETS_CLOCK_MARGIN_MS, 0)
        found = (await asyncio.wait_for(self._consumer.offsets_for_times({tp: since}), COMMIT_TIMEOUT_S)).get(tp)
        if found is None:
            return end, f"no record since {since} ms: only new ones"
        return max(found.offset, begin), f"the first record since {since} ms"

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        self.state.ready = False
        await self._cancel_retries()
        if not revoked:
            return
        await self._drain(self.settings.runtime.shutdown_timeout_s, revoked)
        with contextlib.suppress(KafkaError):
            await self._commit(revoked)
        for tp in revoked:
            track = self._tracks.pop(tp, None)
            if track is not None:
                self._in_flight -= _queued_records(track)
            self.state.assigned.discard(tp)
        self._forget_lag(revoked)
        await self.handler.on_revoked({tp.partition for tp in revoked})

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        # A rebalance may be a rejoin to a broker that lost everything (restarted empty): create the
        # topics before the handler reads its state back, or the reader's metadata request makes
        # the broker create them with its default partition count.
        self._next_topic_check = 0.0
        await self._check_topics(failed=True)
        if self._fatal is not None:
            return
        await self._skip_lost_offsets(assigned)
        self.state.assigned |= assigned
        self._paused = False
        await self._take_over(assigned)
        self.state.ready = not self._retries  # ready once every partition's state is whole

    async def _take_over(self, assigned: set[TopicPartition]) -> None:
        """Let the handler rebuild its state for some partitions, then start handing out their records.

        Tracks only after the handler has rebuilt its state: no record is handled before that. A
        rebuild that fails (a partial read of the state topic, the broker away) is logged, its
        partitions are paused and it is tried again until it succeeds or they are revoked; aiokafka
        would otherwise swallow the error and the records would meet a partial state.
        """
        assert self._consumer is not None
        try:
            await self.handler.on_assigned({tp.partition for tp in assigned})
        except Exception as exc:
            log.error("%s: cannot take over partitions %s (%s: %s); holding them until their state is whole",
                      self.handler.name, sorted(tp.partition for tp in assigned), type(exc).__name__, exc)
            metrics.processing_errors.labels(self.handler.name, "assignment").inc()
            self._consumer.pause(*assigned)
            retry = asyncio.create_task(self._retry_take_over(assigned), name=f"{self.handler.name}-take-over")
            self._retries.add(retry)
            retry.add_done_callback(self._retries.discard)
            return
        for tp in assigned:
            self._tracks.setdefault(tp, _PartitionTrack())

    async def _retry_take_over(self, assigned: set[TopicPartition]) -> None:
        assert self._consumer is not None
        delay = 0.5
        while not self._stopping.is_set():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            assigned = {tp for tp in assigned if tp in self._consumer.assignment() and tp not in self._tracks}
            if not assigned:
                return
            # Whatever the failed attempt kept is dropped first, so the rebuild starts clean.
            await self.handler.on_revoked({tp.partition for tp in assigned})
            try:
                await self.handler.on_assigned({tp.partition for tp in assigned})
            except Exception as exc:
                log.warning("%s: partitions %s still cannot be taken over (%s: %s); retrying in %.1fs", self.handler.name,
                            sorted(tp.partition for tp in assigned), type(exc).__name__, exc, delay)
                continue
            for tp in assigned:
                if tp in self._consumer.assignment():
                    self._tracks.setdefault(tp, _PartitionTrack())
                    if not self._paused:
                        self._consumer.resume(tp)
            log.info("%s: took over partitions %s", self.handler.name, sorted(tp.partition for tp in assigned))
            self.state.ready = self._retries == {asyncio.current_task()}
            return


def _one_record_per_batch(settings: Settings) -> bool:
    return client_overrides(settings, "producer").get("max_batch_size") == 1


def _queued_records(track: _PartitionTrack) -> int:
    if track.queue is None:
        return 0
    return sum(not callable(item) for item in track.queue._queue)  # type: ignore[attr-defined]


async def committed_metadata(consumer: AIOKafkaConsumer, tp: TopicPartition) -> OffsetAndMetadata | None:
    """The group's committed offset of a partition with its metadata (`committed()` drops the
    metadata; aiokafka has no public call for it: the coordinator, which `committed()` uses, is)."""
    found = (await consumer._coordinator.fetch_committed_offsets([tp])).get(tp)
    return None if found is None or found.offset < 0 else found


def _stamp_of(metadata: str | None) -> int | None:
    if metadata and metadata.startswith("ts="):
        with contextlib.suppress(ValueError):
            return int(metadata[3:])
    return None


def _delivery_of(record: ConsumerRecord) -> Delivery:
    return Delivery(record.topic, record.partition, record.offset, decode_key(record.key), record.value)


def _encode_output(output: Output) -> bytes | None:
    try:
        value = value_of(output)
        return None if value is None else encode(value)
    except Exception as exc:  # orjson's depth limit, a pydantic serialization error, a recursion
        raise UndeliverableOutput(
            f"cannot encode the {_kind(output)} for {output.topic}: {type(exc).__name__}: {exc}"
        ) from exc


def _kind(output: Output) -> str:
    return output.value.kind if isinstance(output.value, Deferred) else type(output.value).__name__


def _refused(output: Output, value: bytes | None, exc: BaseException) -> UndeliverableOutput:
    return UndeliverableOutput(
        f"the broker refused the {_kind(output)} of {len(value or b'')} bytes for {output.topic}: "
        f"{type(exc).__name__}: {exc}"
    )


class _Listener(ConsumerRebalanceListener):
    def __init__(self, runner: ServiceRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.runner._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.runner._assigned(set(assigned))


async def _retry_start(start: Callable[[], Awaitable[None]], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        try:
            await start()
            return
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("%s: cannot reach the broker yet (%s)", what, type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def install_signal_handlers(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)

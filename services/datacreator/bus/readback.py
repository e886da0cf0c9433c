"""Reading topics outside a consumer group: state rebuilds after a rebalance, and status watching."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable

from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import ConsumerRecord
from aiokafka.errors import KafkaError

from datacreator.bus.codec import M, PoisonMessage, decode
from datacreator.bus.ends import partition_ends
from datacreator.bus.factory import make_consumer, refresh_metadata
from datacreator.config import Settings
from datacreator.contracts import RequestState, RequestStatus
from datacreator.logic.retention import ReleaseClock

log = logging.getLogger(__name__)

READ_STALL_S = 10.0


class IncompleteRead(RuntimeError):
    """A read for a state rebuild stopped before the end: the state would be partial."""


async def read_to_end(
    settings: Settings, topic: str, partitions: Iterable[int] | None = None, *, complete: bool = False
) -> AsyncIterator[ConsumerRecord]:
    """Every record of some partitions of a topic, from the beginning to the end as of now.

    `complete`: raise IncompleteRead where the read would stop early (see READ_STALL_S)."""
    consumer = make_consumer(settings)
    try:
        await consumer.start()  # inside the try: a failed start must still close the consumer
        if partitions is None:
            found = consumer.partitions_for_topic(topic)
            if found is None:
                await refresh_metadata(consumer)  # topic created after start
                found = consumer.partitions_for_topic(topic) or set()
            partitions = found
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return
        consumer.assign(tps)
        end = await partition_ends(settings, consumer, tps)
        begin = await consumer.beginning_offsets(tps)
        remaining = {tp for tp in tps if end[tp] > begin[tp]}
        for tp in tps:
            consumer.seek(tp, begin[tp])
        progressed = time.monotonic()
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=500)
            if any(batches.values()):
                progressed = time.monotonic()
            elif time.monotonic() - progressed > READ_STALL_S:
                # The broker reports records it does not hand out (Tansu after a restart, until the
                # partition's next write): stop here rather than wait for ever.
                log.warning("read_to_end %s: partitions %s end beyond what the broker returns; stopping at %s",
                            topic, sorted(tp.partition for tp in remaining),
                            {tp.partition: await consumer.position(tp) for tp in remaining})
                if complete:
                    raise IncompleteRead(f"{topic} partitions {sorted(tp.partition for tp in remaining)} "
                                         f"returned nothing for {READ_STALL_S:g} s before their end")
                return
            for tp, records in batches.items():
                for record in records:
                    if record.offset < end[tp]:
                        yield record
                if records and records[-1].offset >= end[tp] - 1:
                    remaining.discard(tp)
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()


async def end_offsets(
    settings: Settings, topic: str, partitions: Iterable[int], timeout_s: float = 5.0
) -> dict[int, int] | None:
    """{partition: end offset} of some partitions, or None when the broker cannot say in time."""
    numbers = sorted(partitions)
    if not numbers:
        return {}
    consumer = make_consumer(settings)
    try:
        async def ends() -> dict[int, int]:
            await consumer.start()
            found = await partition_ends(settings, consumer, [TopicPartition(topic, p) for p in numbers])
            return {tp.partition: offset for tp, offset in found.items()}

        return await asyncio.wait_for(ends(), timeout_s)
    except (TimeoutError, KafkaError) as exc:
        log.warning("end offsets of %s %s: %s", topic, numbers, type(exc).__name__)
        return None
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def read_models(
    settings: Settings, topic: str, model: type[M], partitions: Iterable[int] | None = None, *, complete: bool = False
) -> AsyncIterator[tuple[int, M]]:
    """(partition, message) of every `model` message of some partitions, as `read_to_end`;
    an unreadable record is skipped (it went to the DLQ when it was first consumed)."""
    async for record in read_to_end(settings, topic, partitions, complete=complete):
        try:
            yield record.partition, decode(model, record.value)
        except PoisonMessage:
            continue


class StatusWatcher:
    """Keeps the latest RequestStatus of every request, following the status topic.

    With `release_after_s` (services) a final status is dropped that long after the request ended;
    the request is then still known as closed (`is_closed`, `released_state`). Without it (clients,
    `top`) every status is kept.
    """

    def __init__(self, settings: Settings, on_status: Callable[[RequestStatus], None] | None = None,
                 release_after_s: float | None = None) -> None:
        self.settings = settings
        self.latest: dict[str, RequestStatus] = {}
        self._on_status = on_status
        self._clock = ReleaseClock(release_after_s) if release_after_s is not None else None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def is_closed(self, request_id: str) -> bool:
        status = self.latest.get(request_id)
        return (status is not None and status.state.final) or self.released_state(request_id) is not None

    def released_state(self, request_id: str) -> RequestState | None:
        """The final state of a request whose status was dropped after its hold."""
        return self._clock.released(request_id) if self._clock is not None else None

    def release_due(self, now: float | None = None) -> int:
        """Drop the statuses whose hold has passed; how many went."""
        if self._clock is None:
            return 0
        gone = self._clock.due(time.time() if now is None else now)
        for request_id in gone:
            self.latest.pop(request_id, None)
        return len(gone)

    def release_after(self, seconds: float) -> StatusWatcher:
        """Drop final statuses `seconds` after their request ended (services; see the class)."""
        self._clock = ReleaseClock(seconds)
        return self

    async def start(self) -> StatusWatcher:
        self._task = asyncio.create_task(self._follow(), name="status-watcher")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_change(self, timeout_s: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        self._changed.clear()

    async def _follow(self) -> None:
        topic = self.settings.topics.status
        while True:
            consumer = make_consumer(self.settings, follower=True)
            try:
                await consumer.start()
                partitions = consumer.partitions_for_topic(topic) or set()
                while not partitions:
                    await asyncio.sleep(0.5)
                    await refresh_metadata(consumer)
                    partitions = consumer.partitions_for_topic(topic) or set()
                tps = [TopicPartition(topic, p) for p in partitions]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                while True:
                    batches = await consumer.getmany(timeout_ms=500)
                    for records in batches.values():
                        for record in records:
                            self._apply(record)
                    self.release_due()
            except asyncio.CancelledError:
                raise
            except KafkaError as exc:
                log.warning("status watcher: %s; reconnecting", type(exc).__name__)
                await asyncio.sleep(1)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    def _apply(self, record: ConsumerRecord) -> None:
        try:
            status = decode(RequestStatus, record.value)
        except PoisonMessage:
            return
        if status.supersedes(self.latest.get(status.request_id)):
            self.latest[status.request_id] = status
            self._changed.set()
            if self._on_status is not None:
                self._on_status(status)
        if self._clock is not None:
            self._hold(status, time.time())

    def _hold(self, status: RequestStatus, now: float) -> None:
        """Start the hold of a request that ended; a status of one already released is not kept."""
        assert self._clock is not None
        request_id = status.request_id
        if self._clock.released(request_id) is not None:
            self.latest.pop(request_id, None)  # a late status after the release changes nothing
            return
        kept = self.latest.get(request_id)
        if kept is None or not kept.state.final:
            return
        ended = kept.finished_at or kept.updated_at
        if self._clock.past_hold(ended, now):
            # Read back long after the end (a restart): remember it closed, keep no status.
            self.latest.pop(request_id, None)
            self._clock.release(request_id, kept.state)
        else:
            self._clock.ended(request_id, ended, kept.state)


async def follow_topics(settings: Settings, topics: list[str], poll_timeout_ms: int = 500) -> AsyncIterator[ConsumerRecord]:
    """Every record of some topics from the beginning, then new ones as they come (until cancelled).

    A reader of the whole bus (the web view): no consumer group, nothing committed; it reconnects
    after a broker error and reads again from where it was.
    """
    positions: dict[TopicPartition, int] = {}
    while True:
        consumer = make_consumer(settings, follower=True)
        try:
            await consumer.start()
            tps: list[TopicPartition] = []
            while True:
                await refresh_metadata(consumer)  # topics created after the start
                found = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
                if found != tps:
                    tps = found
                    consumer.assign(tps)
                    for tp in tps:
                        if tp in positions:
                            consumer.seek(tp, positions[tp])
                        else:
                            await consumer.seek_to_beginning(tp)
                deadline = time.monotonic() + 5.0  # look for new partitions every few seconds
                while time.monotonic() < deadline:
                    batches = await consumer.getmany(timeout_ms=poll_timeout_ms)
                    for tp, records in batches.items():
                        for record in records:
                            positions[tp] = record.offset + 1
                            yield record
                    if not tps:
                        await asyncio.sleep(poll_timeout_ms / 1000)
        except asyncio.CancelledError:
            raise
        except KafkaError as exc:
            log.warning("follow %s: %s; reconnecting", ",".join(topics), type(exc).__name__)
            await asyncio.sleep(1)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

"""Reading the examples stream from a training system: an async iterator and a blocking one.

    async for example in stream_examples(settings, request_id, stop_at_completion=True):
        train_on(example.data)

Delivery upstream is at-least-once, so the same example can be on the topic twice; the
iterator yields each example id once per request. With `stop_at_completion` it ends once the
request's status is final and every example published before that has been read.

In a consumer group, only what the caller has finished is committed: an example counts as
finished when the caller asks for the next one, calls `ack()`, or leaves the `async with` block
without an error. An example whose loop body raised is read again by the group's next reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer.fetcher import ConsumerRecord

from datacreator.bus.codec import PoisonMessage, decode
from datacreator.bus.commit import commit
from datacreator.bus.ends import partition_ends
from datacreator.bus.factory import make_consumer, refresh_metadata
from datacreator.bus.readback import StatusWatcher
from datacreator.config import Settings
from datacreator.contracts import Example, RequestStatus

log = logging.getLogger(__name__)


class _Finished:
    """Per partition, the offset up to which every record read has been finished by the caller.

    Records are finished out of order (the sync iterator's buffer, skipped records between two
    examples): the position moves over the longest finished prefix only."""

    def __init__(self) -> None:
        self.positions: dict[int, int] = {}
        self._order: dict[int, deque[int]] = {}
        self._done: dict[int, set[int]] = {}

    def read(self, partition: int, offset: int) -> None:
        self._order.setdefault(partition, deque()).append(offset)

    def finish(self, partition: int, offset: int) -> None:
        done = self._done.setdefault(partition, set())
        done.add(offset)
        order = self._order.get(partition)
        while order and order[0] in done:
            first = order.popleft()
            done.discard(first)
            self.positions[partition] = first + 1


class ExampleStream:
    """Distinct examples from the examples topic, as an async iterator (and async context manager).

    - `request_id`: only that request's examples (None: every request's).
    - `from_beginning`: start at the oldest record (True) or at the end, i.e. new ones only.
    - `from_offsets`: {partition: offset} to resume from, e.g. a saved `positions()`.
    - `stop_at_completion`: end once the request is final and all of its examples were read.
    - `group_id`: read as a member of this consumer group (partitions shared between members,
      positions committed by `commit()` and on close) instead of reading every partition. What is
      committed is what the caller has finished: see `ack`.
    - `consumer_options`: extra AIOKafkaConsumer arguments (e.g. `session_timeout_ms`).
    """

    def __init__(
        self,
        settings: Settings,
        request_id: str | None = None,
        *,
        from_beginning: bool = True,
        from_offsets: dict[int, int] | None = None,
        stop_at_completion: bool = False,
        group_id: str | None = None,
        completion_grace_s: float = 5.0,
        poll_timeout_ms: int = 200,
        consumer_options: dict[str, Any] | None = None,
    ) -> None:
        if stop_at_completion and request_id is None:
            raise ValueError("stop_at_completion needs a request_id")
        if group_id is not None and from_offsets:
            raise ValueError("from_offsets applies to a stream without a consumer group")
        self.settings = settings
        self.request_id = request_id
        self.from_beginning = from_beginning
        self.from_offsets = dict(from_offsets or {})
        self.stop_at_completion = stop_at_completion
        self.group_id = group_id
        self.completion_grace_s = completion_grace_s
        self.poll_timeout_ms = poll_timeout_ms
        self.consumer_options = dict(consumer_options or {})
        self.topic = settings.topics.examples
        self.final_status: RequestStatus | None = None
        self.duplicates_dropped = 0
        self._seen: dict[str, set[str]] = {}
        self._positions: dict[int, int] = {}
        self._finished = _Finished()
        self._outstanding: tuple[int, int] | None = None  # (partition, offset) of the example handed out last
        self._finish_on_next = True  # False: the owner acks by location (the sync iterator's buffer)
        self._consumer: AIOKafkaConsumer | None = None
        self._watcher: StatusWatcher | None = None
        self._iterator: AsyncIterator[Example] | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> ExampleStream:
        await self.start()
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None and self._finish_on_next:
            self.ack()  # left the block normally: done with the one it was given
        await self.close()

    async def start(self) -> None:
        if self._consumer is not None:
            return
        group = self.group_id is not None
        consumer = make_consumer(
            self.settings,
            group_id=self.group_id,
            auto_offset_reset="earliest" if self.from_beginning else "latest",
            **self.consumer_options,
        )
        await consumer.start()
        self._consumer = consumer
        try:
            if group:
                consumer.subscribe([self.topic])
            else:
                tps = await self._partitions(consumer)
                consumer.assign(tps)
                if self.from_beginning:
                    await consumer.seek_to_beginning(*tps)
                else:
                    for tp, end in (await partition_ends(self.settings, consumer, tps)).items():
                        consumer.seek(tp, end)
                for tp in tps:
                    if tp.partition in self.from_offsets:
                        consumer.seek(tp, self.from_offsets[tp.partition])
            if self.stop_at_completion:
                self._watcher = await StatusWatcher(self.settings).start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            if self.group_id is not None:
                with contextlib.suppress(Exception):
                    await self._commit(consumer)
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        found = consumer.partitions_for_topic(self.topic)
        deadline = time.monotonic() + 10
        while not found and time.monotonic() < deadline:
            await refresh_metadata(consumer)  # topic created after the consumer started
            found = consumer.partitions_for_topic(self.topic)
            if not found:
                await asyncio.sleep(0.2)
        if not found:
            raise LookupError(f"topic {self.topic} has no partitions")
        return [TopicPartition(self.topic, p) for p in sorted(found)]

    # -- positions --------------------------------------------------------------------------

    def positions(self, finished_only: bool = False) -> dict[int, int]:
        """{partition: next offset} after the examples handed out so far (with `finished_only`,
        after those the caller has finished); resume with `from_offsets`."""
        return dict(self._finished.positions if finished_only else self._positions)

    def ack(self) -> None:
        """The caller is done with the example handed out last (it is also, by asking for the next)."""
        if self._outstanding is not None:
            self._finished.finish(*self._outstanding)
            self._outstanding = None

    def _finish_at(self, partition: int, offset: int) -> None:
        self._finished.finish(partition, offset)

    async def commit(self) -> None:
        """Commit the group's positions up to what the caller has finished (consumer-group streams
        only): the example being worked on is not, unless `ack()` was called for it."""
        if self._consumer is None or self.group_id is None:
            return
        await self._commit(self._consumer)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        assigned = {tp.partition for tp in consumer.assignment()}
        offsets = {TopicPartition(self.topic, p): o for p, o in self._finished.positions.items() if p in assigned}
        if offsets:
            await commit(consumer, offsets)

    # -- iteration --------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Example]:
        if self._iterator is None:
            self._iterator = self._iterate()
        return self._iterator

    async def __anext__(self) -> Example:
        return await self.__aiter__().__anext__()

    def _accept(self, record: ConsumerRecord) -> Example | None:
        self._positions[record.partition] = record.offset + 1
        self._finished.read(record.partition, record.offset)
        example = self._example(record)
        if example is None:  # nothing for the caller: finished as soon as read
            self._finished.finish(record.partition, record.offset)
        return example

    def _example(self, record: ConsumerRecord) -> Example | None:
        try:
            example = decode(Example, record.value)
        except PoisonMessage as exc:
            log.warning("examples stream: skipping %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
            return None
        if self.request_id is not None and example.request_id != self.request_id:
            return None
        seen = self._seen.setdefault(example.request_id, set())
        if example.example_id in seen:
            self.duplicates_dropped += 1
            return None
        seen.add(example.example_id)
        return example

    async def _iterate(self) -> AsyncIterator[Example]:
        await self.start()
        try:
            end: dict[TopicPartition, int] | None = None
            grace_until = 0.0
            while True:
                consumer = self._consumer
                assert consumer is not None
                batches = await consumer.getmany(timeout_ms=self.poll_timeout_ms)
                for tp in sorted(batches, key=lambda t: t.partition):
                    for record in batches[tp]:
                        example = self._accept(record)
                        if example is not None:
                            self._outstanding = (record.partition, record.offset)
                            yield example
                            if self._finish_on_next:  # the caller asked for the next one
                                self.ack()
                if not self.stop_at_completion:
                    continue
                assert self._watcher is not None and self.request_id is not None
                if end is None:
                    status = self._watcher.latest.get(self.request_id)
                    if status is None or not status.state.final or not consumer.assignment():
                        continue
                    # Everything the request published is on the topic before its final status.
                    self.final_status = status
                    end = await self._end_offsets(consumer)
                    grace_until = time.monotonic() + self.completion_grace_s
                if not await self._reached(consumer, end):
                    continue
                if self._complete() or time.monotonic() >= grace_until:
                    if not self._complete():
                        log.warning("request %s: %d distinct examples read, status says %d accepted",
                                    self.request_id, self.read_count, self.final_status.accepted if self.final_status else -1)
                    return
                # An example acknowledged after the status (different partitions): look again.
                end = await self._end_offsets(consumer)
        finally:
            await self.close()

    @property
    def read_count(self) -> int:
        return len(self._seen.get(self.request_id or "", ())) if self.request_id else sum(map(len, self._seen.values()))

    def _full_view(self) -> bool:
        return self.from_beginning and not self.from_offsets and self.group_id is None

    def _complete(self) -> bool:
        if self.final_status is None or not self._full_view():
            return True
        return self.read_count >= self.final_status.accepted

    async def _end_offsets(self, consumer: AIOKafkaConsumer) -> dict[TopicPartition, int]:
        return await partition_ends(self.settings, consumer, consumer.assignment())

    async def _reached(self, consumer: AIOKafkaConsumer, end: dict[TopicPartition, int]) -> bool:
        for tp, last in end.items():
            if tp not in consumer.assignment():
                continue
            position = max(self._positions.get(tp.partition, 0), await consumer.position(tp))
            if position < last:
                return False
        return True


# One constructor serves both names, so the documented entry point keeps `ExampleStream`'s options.
stream_examples = ExampleStream


_DONE = object()


def iter_examples(settings: Settings, request_id: str | None = None, *, buffer: int = 1000, **options: Any) -> Iterator[Example]:
    """`stream_examples` for synchronous code: the stream runs on an event loop in a background thread.

    Closing the iterator (or leaving a `for` loop early) stops the thread. In a consumer group,
    an example is finished (and committed) once the caller asks for the next one: the examples
    waiting in the buffer, and the one the caller's loop raised on or left with, are not.
    """
    items: queue.Queue[Any] = queue.Queue(maxsize=buffer)
    stop = threading.Event()
    streams: list[ExampleStream] = []

    async def pump() -> None:
        async with stream_examples(settings, request_id, **options) as stream:
            stream._finish_on_next = False  # buffered is not finished: the reading thread says when
            streams.append(stream)
            async for example in stream:
                location = stream._outstanding
                while True:  # never block the loop: the consumer's heartbeats run on it
                    if stop.is_set():
                        break
                    try:
                        items.put_nowait((example, location))
                        break
                    except queue.Full:
                        await asyncio.sleep(0.02)
                if stop.is_set():
                    await asyncio.sleep(0)  # the reading thread's last acks, queued before it stopped, run first
                    return

    loop = asyncio.new_event_loop()
    pumping: asyncio.Task[None] | None = None

    def run() -> None:
        nonlocal pumping
        outcome: Any = _DONE
        try:
            asyncio.set_event_loop(loop)
            pumping = loop.create_task(pump())
            loop.run_until_complete(pumping)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # handed to the reading thread
            outcome = exc
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        while not stop.is_set():
            try:
                items.put(outcome, timeout=0.1)
                return
            except queue.Full:
                continue

    def finished(location: tuple[int, int] | None) -> None:
        if location is not None and streams:
            with contextlib.suppress(RuntimeError):  # the loop has already finished
                loop.call_soon_threadsafe(streams[0]._finish_at, *location)

    thread = threading.Thread(target=run, name="datacreator-examples", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            example, location = item
            yield example
            finished(location)  # the caller asked for the next one
    finally:
        stop.set()
        with contextlib.suppress(RuntimeError):  # the loop has already finished
            if pumping is not None:
                loop.call_soon_threadsafe(pumping.cancel)
        thread.join(timeout=10)

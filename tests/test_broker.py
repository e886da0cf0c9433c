"""The embedded broker (Tansu) with the clients the services use: aiokafka, and kcat for interop."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import struct
import subprocess
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from datacreator.bus import ends, readback
from datacreator.bus.admin import TopicMismatch, ensure_topics, wait_for_broker
from datacreator.config import Settings
from datacreator.embedded.broker import EmbeddedBroker, free_port
from tests.fixtures.broker import unique_topics

pytestmark = pytest.mark.timeout(60)


def _group_consumer(settings: Settings, topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        **settings.kafka_kwargs(),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        partition_assignment_strategy=(RangePartitionAssignor,),
        # Tansu's join and rebalance times scale with the session timeout: keep it short.
        session_timeout_ms=2000,
        heartbeat_interval_ms=200,
    )


async def _produce(settings: Settings, topic: str, records: list[tuple[int, bytes]]) -> None:
    producer = AIOKafkaProducer(**settings.kafka_kwargs(), acks="all")
    await producer.start()
    try:
        for partition, value in records:
            await producer.send_and_wait(topic, value, partition=partition)
    finally:
        await producer.stop()


async def _read_partition(settings: Settings, topic: str, partition: int, want: int) -> list:
    consumer = AIOKafkaConsumer(**settings.kafka_kwargs())
    await consumer.start()
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)
    out: list = []
    try:
        deadline = time.monotonic() + 10
        while len(out) < want and time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=500)
            out.extend(batch.get(tp, []))
    finally:
        await consumer.stop()
    return out


async def test_round_trip_keeps_key_value_and_headers(bus_settings):
    topic = bus_settings.topics.requests
    headers = [("content-type", b"application/json"), ("request-id", b"r-1"), ("empty", b"")]
    producer = AIOKafkaProducer(**bus_settings.kafka_kwargs(), acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, b'{"n": 1}', key=b"r-1", partition=1, headers=headers)
    finally:
        await producer.stop()

    [record] = await _read_partition(bus_settings, topic, 1, want=1)
    assert (record.offset, record.key, record.value) == (sent.offset, b"r-1", b'{"n": 1}')
    assert list(record.headers) == headers


async def _one_batch(settings: Settings, topic: str, values: list[bytes], partition: int = 0) -> list[int]:
    """Records sent in one produce request, as one batch: all appended before the sender runs."""
    producer = AIOKafkaProducer(**settings.kafka_kwargs(), acks="all", linger_ms=50)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=b"k", partition=partition) for value in values]
        return [m.offset for m in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


async def test_end_offsets_after_a_multi_record_batch_count_only_its_first_record(bus_settings):
    # Why the embedded broker's profile says `short_list_offsets` (EmbeddedBroker.client_overrides):
    # Tansu's ListOffsets answers the last batch's base offset + 1. When this fails, Tansu has
    # fixed it and bus.ends may stop fetching the last batch.
    topic = bus_settings.topics.outcomes
    tp = TopicPartition(topic, 0)
    offsets = await _one_batch(bus_settings, topic, [b"c0", b"c1", b"c2"])
    consumer = AIOKafkaConsumer(**bus_settings.kafka_kwargs())
    await consumer.start()
    try:
        ends = await consumer.end_offsets([tp])
    finally:
        await consumer.stop()
    assert ends[tp] == offsets[0] + 1


async def test_bus_ends_and_reads_to_end_count_every_record_of_a_last_batch(bus_settings):
    # The bus's answer to the test above: the end read from a fetch of the last batch, on a probe
    # consumer of its own (the caller's position does not move), and a state rebuild that reads
    # every record of it.
    topic = bus_settings.topics.outcomes
    tp = TopicPartition(topic, 1)
    await _one_batch(bus_settings, topic, [b"x0"], partition=1)
    offsets = await _one_batch(bus_settings, topic, [b"d0", b"d1", b"d2", b"d3"], partition=1)
    consumer = AIOKafkaConsumer(**bus_settings.kafka_kwargs())
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        assert (await consumer.end_offsets([tp]))[tp] == offsets[0] + 1  # short, as above
        assert await ends.partition_ends(bus_settings, consumer, [tp]) == {tp: offsets[-1] + 1}
        assert await consumer.position(tp) == 0
    finally:
        await consumer.stop()
    assert await readback.end_offsets(bus_settings, topic, [1]) == {1: offsets[-1] + 1}
    read = [record.value async for record in readback.read_to_end(bus_settings, topic, [1])]
    assert read == [b"x0", b"d0", b"d1", b"d2", b"d3"]
    # A broker whose profile does not say so is asked once, as Apache Kafka is.
    plain = bus_settings.with_updates(kafka_client_overrides={})
    assert not ends.short_list_offsets(plain) and ends.short_list_offsets(bus_settings)


async def test_a_waiting_consumer_gets_every_record_of_a_batch(bus_settings):
    # Fetches are not what the single-record batches are for: a consumer already waiting at the
    # end gets the whole batch without a later write.
    topic = bus_settings.topics.examples
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(**bus_settings.kafka_kwargs(), **EmbeddedBroker.client_overrides()["consumer"])
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        start = await consumer.position(tp)
        waiting = asyncio.ensure_future(consumer.getmany(tp, timeout_ms=5000))
        await asyncio.sleep(0.2)
        values = [f"v{i}".encode() for i in range(5)]
        offsets = await _one_batch(bus_settings, topic, values)
        assert offsets == list(range(start, start + 5))
        got = list((await waiting).get(tp, []))
        deadline = time.monotonic() + 5
        while len(got) < 5 and time.monotonic() < deadline:
            got += (await consumer.getmany(tp, timeout_ms=500)).get(tp, [])
    finally:
        await consumer.stop()
    assert [r.value for r in got] == values
    assert consumer.highwater(tp) == start + 5


async def test_a_fetch_from_inside_a_batch_returns_the_rest_of_it(bus_settings):
    # A committed offset lands inside a batch whenever a batch was partly processed: the new owner
    # must read from there (earlier Tansu builds skipped to the next batch).
    topic = bus_settings.topics.rejected
    tp = TopicPartition(topic, 0)
    first = await _one_batch(bus_settings, topic, [b"a0", b"a1", b"a2", b"a3"])
    await _one_batch(bus_settings, topic, [b"b4", b"b5"])
    for inside, want in ((first[1], [b"a1", b"a2", b"a3", b"b4", b"b5"]), (first[3], [b"a3", b"b4", b"b5"])):
        consumer = AIOKafkaConsumer(**bus_settings.kafka_kwargs())
        await consumer.start()
        try:
            consumer.assign([tp])
            consumer.seek(tp, inside)
            got: list = []
            deadline = time.monotonic() + 10
            while len(got) < len(want) and time.monotonic() < deadline:
                got += (await consumer.getmany(tp, timeout_ms=500)).get(tp, [])
        finally:
            await consumer.stop()
        assert [r.value for r in got] == want


@pytest.mark.slow
async def test_group_resumes_from_committed_offset_after_restart(bus_settings):
    topic = bus_settings.topics.tasks
    await _produce(bus_settings, topic, [(p, f"{p}-{i}".encode()) for i in range(3) for p in range(3)])
    group = f"{topic}.g"

    first = _group_consumer(bus_settings, topic, group)
    await first.start()
    seen: list = []
    try:
        while len(seen) < 9:
            batch = await asyncio.wait_for(first.getmany(timeout_ms=500), 10)
            for records in batch.values():
                seen.extend(records)
        # Only the first record of each partition counts as processed.
        await first.commit({TopicPartition(topic, p): 1 for p in range(3)})
    finally:
        await first.stop()
    assert sorted(r.value for r in seen) == sorted(f"{p}-{i}".encode() for i in range(3) for p in range(3))

    second = _group_consumer(bus_settings, topic, group)
    await second.start()
    resumed: list = []
    try:
        assert [await second.committed(TopicPartition(topic, p)) for p in range(3)] == [1, 1, 1]
        while len(resumed) < 6:
            batch = await asyncio.wait_for(second.getmany(timeout_ms=500), 10)
            for records in batch.values():
                resumed.extend(records)
        extra = await second.getmany(timeout_ms=500)
    finally:
        await second.stop()
    assert sorted(r.value for r in resumed) == sorted(f"{p}-{i}".encode() for i in (1, 2) for p in range(3))
    assert not any(extra.values())


@pytest.mark.slow
async def test_two_group_members_split_partitions_and_one_takes_all_on_leave(bus_settings):
    topic = bus_settings.topics.candidates
    group = f"{topic}.g"
    one = _group_consumer(bus_settings, topic, group)
    two = _group_consumer(bus_settings, topic, group)

    def parts(consumer: AIOKafkaConsumer) -> set[int]:
        return {tp.partition for tp in consumer.assignment()}

    await one.start()
    try:
        await two.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            await asyncio.gather(one.getmany(timeout_ms=200), two.getmany(timeout_ms=200))
            a, b = parts(one), parts(two)
            if a and b and not a & b and a | b == {0, 1, 2}:
                break
        assert parts(one) and parts(two)
        assert not parts(one) & parts(two)
        assert parts(one) | parts(two) == {0, 1, 2}

        await two.stop()
        deadline = time.monotonic() + 20
        while parts(one) != {0, 1, 2} and time.monotonic() < deadline:
            await one.getmany(timeout_ms=200)
        assert parts(one) == {0, 1, 2}
    finally:
        await two.stop()
        await one.stop()


async def test_end_and_beginning_offsets(bus_settings):
    topic = bus_settings.topics.examples
    await _produce(bus_settings, topic, [(0, b"a"), (0, b"b"), (2, b"c")])
    consumer = AIOKafkaConsumer(**bus_settings.kafka_kwargs())
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(3)]
        end = await consumer.end_offsets(tps)
        begin = await consumer.beginning_offsets(tps)
    finally:
        await consumer.stop()
    assert [end[tp] for tp in tps] == [2, 0, 1]
    assert [begin[tp] for tp in tps] == [0, 0, 0]


async def test_ensure_topics_is_idempotent_and_marks_compacted_topics(broker):
    settings = Settings(kafka_bootstrap=broker.bootstrap, topics=unique_topics(), topic_partitions=3)
    await ensure_topics(settings)
    await ensure_topics(settings)  # a second run finds everything there
    with pytest.raises(TopicMismatch, match="has 3; expected 5"):  # existing: untouched, and refused
        await ensure_topics(settings, topics=[settings.topics.requests], partitions=5)

    admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
    await admin.start()
    try:
        assert set(settings.topics.all()) <= set(await admin.list_topics())
        described = await admin.describe_topics(settings.topics.all())
        assert {t["topic"]: len(t["partitions"]) for t in described} == {n: 3 for n in settings.topics.all()}
        compacted = sorted(settings.topics.compacted())
        plain = settings.topics.requests
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, n) for n in [*compacted, plain]]
        )
        policies = {res[3]: {e[0]: e[1] for e in res[4]}.get("cleanup.policy") for res in response.resources}
    finally:
        await admin.close()
    assert {n: policies[n] for n in compacted} == {n: "compact" for n in compacted}
    assert policies[plain] != "compact"


async def test_ensure_topics_gives_up_with_a_clear_error_when_no_broker():
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not answer"):
        await ensure_topics(settings, timeout_s=1.5)
    assert time.monotonic() - started < 10


@pytest.mark.slow
async def test_restart_on_same_port_and_producer_reconnects(fresh_broker):
    settings = Settings(kafka_bootstrap=fresh_broker.bootstrap, topics=unique_topics(), topic_partitions=3)
    topic = settings.topics.outcomes
    await ensure_topics(settings)
    producer = AIOKafkaProducer(**settings.kafka_kwargs(), acks="all", request_timeout_ms=5000, retry_backoff_ms=200)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"before", partition=0)
        port, pid = fresh_broker.port, fresh_broker.pid

        await fresh_broker.restart()
        assert (fresh_broker.port, fresh_broker.bootstrap) == (port, settings.kafka.bootstrap)
        assert fresh_broker.pid != pid and not _alive(pid)
        await ensure_topics(settings)  # the memory engine starts empty

        deadline = time.monotonic() + 20
        while True:
            try:
                await asyncio.wait_for(producer.send_and_wait(topic, b"after", partition=0), 5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await producer.stop()
    records = await _read_partition(settings, topic, 0, want=1)
    assert [r.value for r in records] == [b"after"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purpose once reaped or a zombie.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_stop_leaves_no_process_and_keeps_output_in_the_log(tmp_path):
    log_path = tmp_path / "tansu.log"
    broker = EmbeddedBroker(log_path=str(log_path))
    async with broker:
        pid = broker.pid
        assert pid is not None and _alive(pid)
        await wait_for_broker(Settings(kafka_bootstrap=broker.bootstrap), timeout_s=5)
        bootstrap = broker.bootstrap
    assert not _alive(pid)
    assert broker.pid is None
    host, port = bootstrap.split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1).close()
    assert "tansu" in log_path.read_text()


# --- kcat interop ---------------------------------------------------------------------------

KCAT = shutil.which("kcat")


def _librdkafka_version() -> tuple[int, ...]:
    out = subprocess.run([KCAT, "-V"], capture_output=True, text=True, timeout=10).stdout  # type: ignore[list-item]
    found = re.search(r"librdkafka (\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in found.groups()) if found else (0, 0, 0)


class TagStrippingRelay:
    """TCP relay to the broker that empties the tagged fields of ApiVersions v3+ responses.

    librdkafka before 2.2 mis-skips non-empty tagged fields (confluentinc/librdkafka#4278) and
    Tansu sends default-valued ones in ApiVersions v3. Those fields carry nothing librdkafka
    uses; every other byte (produce and fetch record batches included) passes unchanged.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server: asyncio.Server | None = None
        self.port = 0
        self.rewritten = 0

    async def start(self) -> TagStrippingRelay:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()

    @staticmethod
    async def _frame(reader: asyncio.StreamReader) -> bytes | None:
        try:
            size = struct.unpack(">i", await reader.readexactly(4))[0]
            return await reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        pending: dict[int, tuple[int, int]] = {}

        async def to_broker() -> None:
            while (frame := await self._frame(client_r)) is not None:
                api_key, version, correlation = struct.unpack(">hhi", frame[:8])
                pending[correlation] = (api_key, version)
                up_w.write(struct.pack(">i", len(frame)) + frame)
                await up_w.drain()

        async def to_client() -> None:
            while (frame := await self._frame(up_r)) is not None:
                api_key, version = pending.pop(struct.unpack(">i", frame[:4])[0], (-1, -1))
                if api_key == 18 and version >= 3:
                    frame = _without_trailing_tags(frame)
                    self.rewritten += 1
                client_w.write(struct.pack(">i", len(frame)) + frame)
                await client_w.drain()

        try:
            tasks = [asyncio.ensure_future(to_broker()), asyncio.ensure_future(to_client())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
        finally:
            for writer in (up_w, client_w):
                writer.close()


def _uvarint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _skip_tags(data: bytes, at: int) -> int:
    count, at = _uvarint(data, at)
    for _ in range(count):
        _, at = _uvarint(data, at)
        size, at = _uvarint(data, at)
        at += size
    return at


def _without_trailing_tags(frame: bytes) -> bytes:
    # correlation id (4), error code (2), compact array of (key, min, max, tags), throttle (4), tags
    entries, at = _uvarint(frame, 6)
    for _ in range(entries - 1):
        at = _skip_tags(frame, at + 6)
    at += 4
    return frame[:at] + b"\x00"


def test_relay_rewrites_only_the_trailing_tags():
    body = struct.pack(">ih", 7, 0) + bytes([2]) + struct.pack(">hhh", 0, 0, 11) + b"\x01\x01\x00"
    body += struct.pack(">i", 0)
    tags = b"\x02" + b"\x00\x01\x01" + b"\x01\x08" + b"\xff" * 8
    stripped = _without_trailing_tags(body + tags)
    assert stripped == body + b"\x00"


async def _kcat(*args: str, stdin: bytes | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        KCAT, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")
    return out.decode()


@pytest.mark.skipif(KCAT is None, reason="kcat is not installed (Debian package kcat)")
async def test_kcat_and_aiokafka_read_each_others_records():
    port = free_port()
    relay: TagStrippingRelay | None = None
    advertised = None
    if _librdkafka_version() < (2, 2, 0):
        relay = await TagStrippingRelay(port).start()
        advertised = f"127.0.0.1:{relay.port}"
    broker = EmbeddedBroker(port=port, advertised=advertised)
    try:
        await broker.start()
        settings = Settings(kafka_bootstrap=broker.bootstrap, topics=unique_topics(), topic_partitions=3)
        topic = settings.topics.examples
        await ensure_topics(settings, topics=[topic])
        kcat_bootstrap = advertised or broker.bootstrap

        await _kcat("-P", "-b", kcat_bootstrap, "-t", topic, "-p", "1", "-k", "from-kcat", "-H", "origin=kcat",
                    stdin=b'{"via": "kcat"}')
        [record] = await _read_partition(settings, topic, 1, want=1)
        assert (record.key, record.value) == (b"from-kcat", b'{"via": "kcat"}')
        assert ("origin", b"kcat") in list(record.headers)

        producer = AIOKafkaProducer(**settings.kafka_kwargs(), acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, b'{"via": "aiokafka"}', key=b"from-aiokafka", partition=2,
                                         headers=[("origin", b"aiokafka")])
        finally:
            await producer.stop()
        out = await _kcat("-C", "-b", kcat_bootstrap, "-t", topic, "-p", "2", "-o", "beginning", "-c", "1", "-e",
                          "-f", "%k|%s|%h\n")
        assert out.strip() == 'from-aiokafka|{"via": "aiokafka"}|origin=aiokafka'
        if relay is not None:
            assert relay.rewritten >= 1
    finally:
        await broker.stop()
        if relay is not None:
            await relay.stop()

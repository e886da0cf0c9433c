"""The examples stream for training systems, against the real broker."""

from __future__ import annotations

import asyncio
import time

import pytest

from datacreator.bus.codec import encode, encode_key
from datacreator.bus.factory import make_producer
from datacreator.consumer import ExampleStream, iter_examples, stream_examples
from datacreator.contracts import Example, RequestState, RequestStatus, Strategy
from datacreator.logic.dedup import example_id

pytestmark = pytest.mark.timeout(60)


def make_example(request_id: str, n: int) -> Example:
    data = {"text": f"example number {n} of {request_id}", "label": n % 2 == 0}
    return Example(
        example_id=example_id(request_id, data), request_id=request_id, data=data, strategy=Strategy.random,
        reference_ids=[None], task_id=f"{request_id}-t{n // 5}", chain=0, step=n // 5, model="m",
    )


async def publish(settings, topic: str, messages: list[tuple[str, object]], partition: int | None = None) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for key, message in messages:
            await producer.send_and_wait(topic, encode(message), key=encode_key(key), partition=partition)
    finally:
        await producer.stop()


def status(request_id: str, state: RequestState, accepted: int) -> RequestStatus:
    return RequestStatus(request_id=request_id, state=state, target_count=accepted, accepted=accepted)


async def take_ids(stream: ExampleStream, count: int) -> list[str]:
    """Example ids from an open stream, leaving it once `count` were read (it does not end by itself)."""
    ids: list[str] = []
    async for example in stream:
        ids.append(example.example_id)
        if len(ids) == count:
            break
    return ids


async def test_redeliveries_and_other_requests_are_dropped(bus_settings):
    a = [make_example("req-a", n) for n in range(12)]
    b = [make_example("req-b", n) for n in range(5)]
    # Every example of a twice (a redelivery after a crash), interleaved with b.
    messages = [("req-a", e) for e in a] + [("req-b", e) for e in b] + [("req-a", e) for e in a[:7]]
    await publish(bus_settings, bus_settings.topics.examples, messages)
    # The same example on a second partition (as after a producer retry with another key).
    await publish(bus_settings, bus_settings.topics.examples, [("x", a[3])], partition=2)
    await publish(bus_settings, bus_settings.topics.status, [("req-a", status("req-a", RequestState.COMPLETED, 12))])

    stream = stream_examples(bus_settings, "req-a", stop_at_completion=True)
    got = [e async for e in stream]
    assert [e.example_id for e in got].count(a[3].example_id) == 1
    assert sorted(e.example_id for e in got) == sorted(e.example_id for e in a)
    assert stream.duplicates_dropped == 8
    assert stream.final_status is not None and stream.final_status.state is RequestState.COMPLETED

    # No request filter: both requests, each id once.
    async with ExampleStream(bus_settings) as everything:
        seen = await take_ids(everything, 17)
    assert sorted(seen) == sorted(e.example_id for e in a + b)


async def test_stop_at_completion_waits_for_status_and_examples(bus_settings):
    rid = "req-live"
    examples = [make_example(rid, n) for n in range(20)]
    topic = bus_settings.topics.examples
    await publish(bus_settings, bus_settings.topics.status, [(rid, status(rid, RequestState.RUNNING, 0))])
    got: list[Example] = []

    async def read() -> float:
        async for example in stream_examples(bus_settings, rid, stop_at_completion=True):
            got.append(example)
        return time.monotonic()

    reader = asyncio.create_task(read())
    await publish(bus_settings, topic, [(rid, e) for e in examples[:10]])
    await asyncio.sleep(1.0)
    assert not reader.done(), "the stream ended before the request was final"
    await publish(bus_settings, topic, [(rid, e) for e in examples[10:]] + [(rid, examples[0])])
    finished_status_at = time.monotonic()
    await publish(bus_settings, bus_settings.topics.status, [(rid, status(rid, RequestState.COMPLETED, 20))])
    ended = await asyncio.wait_for(reader, 20)
    assert ended >= finished_status_at
    assert sorted(e.example_id for e in got) == sorted(e.example_id for e in examples)


async def test_resume_from_positions(bus_settings):
    rid = "req-resume"
    examples = [make_example(rid, n) for n in range(8)]
    await publish(bus_settings, bus_settings.topics.examples, [(rid, e) for e in examples])
    async with ExampleStream(bus_settings, rid) as first:
        taken = await take_ids(first, 3)
        positions = first.positions()
    async with ExampleStream(bus_settings, rid, from_offsets=positions) as second:
        rest = await take_ids(second, len(examples) - len(taken))
    assert sorted(taken + rest) == sorted(e.example_id for e in examples)


async def test_consumer_group_commits_positions(bus_settings):
    rid = "req-group"
    examples = [make_example(rid, n) for n in range(6)]
    await publish(bus_settings, bus_settings.topics.examples, [(rid, e) for e in examples])
    group = f"trainer-{bus_settings.topics.examples}"
    # Tansu's join time scales with the session timeout: keep it short.
    fast = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 200}
    async with ExampleStream(bus_settings, rid, group_id=group, consumer_options=fast) as stream:
        got = await take_ids(stream, 6)
    assert sorted(got) == sorted(e.example_id for e in examples)
    more = make_example(rid, 99)
    await publish(bus_settings, bus_settings.topics.examples, [(rid, more)])
    # The group resumes after its committed positions: only the new example comes.
    async with ExampleStream(bus_settings, rid, group_id=group, consumer_options=fast) as again:
        first = await asyncio.wait_for(again.__anext__(), 25)
    assert first.example_id == more.example_id


async def test_sync_iterator(bus_settings):
    rid = "req-sync"
    examples = [make_example(rid, n) for n in range(5)]
    await publish(bus_settings, bus_settings.topics.examples, [(rid, e) for e in examples + examples[:2]])
    await publish(bus_settings, bus_settings.topics.status, [(rid, status(rid, RequestState.COMPLETED, 5))])

    ids = await asyncio.to_thread(
        lambda: [e.example_id for e in iter_examples(bus_settings, rid, stop_at_completion=True)]
    )
    assert sorted(ids) == sorted(e.example_id for e in examples)

    def first_two() -> list[str]:
        out = []
        for example in iter_examples(bus_settings, rid):  # never ends by itself: leaving the loop stops it
            out.append(example.example_id)
            if len(out) == 2:
                break
        return out

    assert len(set(await asyncio.to_thread(first_two))) == 2


# -- what a consumer group commits: only what the caller has finished ----------------------------

FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 200}


async def _first_of_group(settings, rid: str, group: str, count: int = 1) -> list[str]:
    async with ExampleStream(settings, rid, group_id=group, consumer_options=FAST_GROUP) as stream:
        return await asyncio.wait_for(take_ids(stream, count), 25)


async def test_a_group_stream_does_not_commit_the_example_the_callers_loop_raised_on(bus_settings):
    """Real broker. The caller's loop raised on the third example; closing the stream committed up
    to it, so the group's next reader started at the fourth and the third was never trained on."""
    rid = "req-raise"
    examples = [make_example(rid, n) for n in range(6)]
    await publish(bus_settings, bus_settings.topics.examples, [(rid, e) for e in examples])
    group = f"trainer-raise-{bus_settings.topics.examples}"
    with pytest.raises(RuntimeError, match="training step failed"):
        async with ExampleStream(bus_settings, rid, group_id=group, consumer_options=FAST_GROUP) as stream:
            n = 0
            async for _example in stream:
                n += 1
                if n == 2:
                    await stream.commit()  # the second is being worked on: only the first is committed
                if n == 3:
                    raise RuntimeError("training step failed")
    assert await _first_of_group(bus_settings, rid, group, 4) == [e.example_id for e in examples[2:]]

    # An explicit ack counts the example being worked on as finished.
    more = [make_example(rid, n) for n in range(100, 102)]
    await publish(bus_settings, bus_settings.topics.examples, [(rid, e) for e in more])
    with pytest.raises(RuntimeError):
        async with ExampleStream(bus_settings, rid, group_id=group, consumer_options=FAST_GROUP) as stream:
            async for example in stream:
                if example.example_id == more[0].example_id:
                    stream.ack()
                    raise RuntimeError("after the ack")
    assert await _first_of_group(bus_settings, rid, group) == [more[1].example_id]


async def test_the_sync_iterator_commits_neither_its_buffer_nor_the_example_it_was_left_with(bus_settings):
    """Real broker. iter_examples buffers up to 1,000 examples ahead of the caller; in a group the
    stream committed everything it had handed to the buffer, so a reader that stopped after two
    skipped the rest for the group. Now only the examples the caller moved past are committed."""
    rid = "req-buffer"
    examples = [make_example(rid, n) for n in range(30)]
    await publish(bus_settings, bus_settings.topics.examples, [(rid, e) for e in examples])
    group = f"trainer-buffer-{bus_settings.topics.examples}"

    def first_two() -> list[str]:
        got = []
        for example in iter_examples(bus_settings, rid, group_id=group, consumer_options=FAST_GROUP):
            got.append(example.example_id)
            if len(got) == 2:
                break
        return got

    assert await asyncio.to_thread(first_two) == [e.example_id for e in examples[:2]]
    rest = await _first_of_group(bus_settings, rid, group, 29)
    assert rest == [e.example_id for e in examples[1:]]

"""A commit cut short (timeout, shutdown) must not leave aiokafka's request behind to print a
"Task exception was never retrieved" traceback when that request fails later, as it does when the
broker is stopped under it. The embedded broker answers a commit at once, so a wrapper around the
consumer's coordinator holds the request in flight and then fails it as a closed connection would
(fault injection); the consumer, its group and the broker are real."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

from datacreator.bus.commit import commit
from datacreator.bus.factory import make_consumer


async def _unretrieved_after_cut(consumer, offsets, cut) -> list[dict]:  # type: ignore[no-untyped-def]
    coordinator = consumer._coordinator
    original = coordinator._send_req
    held: list[asyncio.Task] = []
    fail = asyncio.Event()

    async def held_then_failed(request):  # type: ignore[no-untyped-def]
        if not type(request).__name__.startswith("OffsetCommitRequest"):
            return await original(request)  # heartbeats go through
        held.append(asyncio.current_task())  # type: ignore[arg-type]
        await fail.wait()
        raise KafkaConnectionError("Connection at 127.0.0.1 closed")

    coordinator._send_req = held_then_failed
    reported: list[dict] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        await cut(consumer, offsets)
        assert held, "the commit request was never sent"
        fail.set()
        done, _ = await asyncio.wait(set(held), timeout=10)
        # Read from the repr: asking the task for its exception would count as retrieving it.
        assert done and all("exception=" in repr(t) for t in done), f"the held request did not fail: {done}"
        held.clear()
        del done
        gc.collect()
        await asyncio.sleep(0)
        return [c for c in reported if "never retrieved" in c.get("message", "")]
    finally:
        fail.set()
        loop.set_exception_handler(previous)
        coordinator._send_req = original


async def _bare_wait_for(consumer, offsets) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(consumer.commit(offsets), 0.2)


async def _ours_timed_out(consumer, offsets) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KafkaTimeoutError):
        await commit(consumer, offsets, timeout_s=0.2)


async def _ours_cancelled(consumer, offsets) -> None:  # type: ignore[no-untyped-def]
    task = asyncio.create_task(commit(consumer, offsets))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_commit_cut_short_leaves_no_unretrieved_failure_behind(bus_settings):
    topic = bus_settings.topics.tasks
    consumer = make_consumer(bus_settings, group_id=f"g-{topic}")
    consumer.subscribe([topic])
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        while not consumer.assignment():
            assert time.monotonic() < deadline, "the consumer never joined its group"
            await consumer.getmany(timeout_ms=200)
        offsets = {TopicPartition(topic, 0): 0}
        # Control: with a bare wait_for asyncio reports the abandoned request, so the fault is real.
        assert await _unretrieved_after_cut(consumer, offsets, _bare_wait_for), "the fault was not reproduced"
        assert await _unretrieved_after_cut(consumer, offsets, _ours_timed_out) == []
        assert await _unretrieved_after_cut(consumer, offsets, _ours_cancelled) == []
        await commit(consumer, offsets, timeout_s=10)  # and the consumer still commits
        assert await consumer.committed(TopicPartition(topic, 0)) == 0
    finally:
        await asyncio.wait_for(consumer.stop(), 10)

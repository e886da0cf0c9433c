"""How long a consumer's fetch may wait on the broker (bus/fetchwait.py, bus/factory.py).

The embedded broker answers a fetch only when its wait is over, so a service's consumer waits
less while records flow and the usual time once they stop; status followers wait longer. The
real-broker tests read the waits from the fetch requests the consumers send.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import TopicPartition

from datacreator.bus import runtime
from datacreator.bus.codec import encode
from datacreator.bus.factory import FOLLOWER_FETCH_WAIT_MS, make_consumer, make_producer
from datacreator.bus.fetchwait import QUIET_S, AdaptiveFetchWait, adaptive_fetch_wait, busy_fetch_wait_ms
from datacreator.bus.readback import StatusWatcher
from datacreator.bus.runtime import ServiceRunner
from datacreator.config import Settings
from datacreator.contracts import RequestState, RequestStatus
from datacreator.embedded.broker import EmbeddedBroker
from tests.test_delivery import FAST_GROUPS, EchoHandler, Note, _produce


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_wait_is_short_while_records_come_and_the_usual_one_after_a_quiet_spell():
    clock = _Clock()
    wait = AdaptiveFetchWait(idle_ms=25, busy_ms=8, quiet_s=1.0, clock=clock)
    assert wait.observe(False) == 25  # nothing seen yet
    assert wait.observe(True) == 8
    clock.now += 0.9
    assert wait.observe(False) == 8  # records 0.9 s ago: still flowing
    clock.now += 0.2
    assert wait.observe(False) == 25
    assert wait.observe(True) == 8


def test_a_busy_wait_never_exceeds_the_usual_one():
    assert AdaptiveFetchWait(idle_ms=5, busy_ms=8).observe(True) == 5


async def test_only_a_broker_whose_profile_asks_for_it_gets_an_adaptive_wait(bus_settings):
    kafka = Settings()
    assert busy_fetch_wait_ms(kafka) is None
    assert adaptive_fetch_wait(kafka, make_consumer(kafka)) is None  # Kafka answers as records come
    embedded = bus_settings
    assert embedded.kafka.client_overrides == EmbeddedBroker.client_overrides()
    consumer = make_consumer(embedded)
    await consumer.start()  # the wait is its fetcher's, made at the start
    consumer.assign([TopicPartition(embedded.topics.status, 0)])
    try:
        await consumer.getmany(timeout_ms=50)  # stopped before its first fetch, aiokafka raises CancelledError
        fetch_wait = adaptive_fetch_wait(embedded, consumer)
        assert fetch_wait is not None
        assert (fetch_wait.policy.idle_ms, fetch_wait.policy.busy_ms) == (25, busy_fetch_wait_ms(embedded))
        assert fetch_wait.policy.quiet_s == QUIET_S
        assert fetch_wait.current_ms == 25
    finally:
        await consumer.stop()


def _record_fetch_waits(consumer: Any, waits: list[int]) -> Any:
    """Wraps the consumer's client so that each fetch request it sends is noted with its wait."""
    send = consumer._client.send

    async def noting(node_id: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        if type(request).__name__ == "FetchRequest":
            waits.append(request._max_wait_ms)
        return await send(node_id, request, *args, **kwargs)

    consumer._client.send = noting
    return consumer


async def test_a_services_consumer_fetches_with_the_short_wait_while_records_flow_then_the_usual_one(bus_settings, monkeypatch):
    settings = bus_settings.with_updates(**FAST_GROUPS)
    busy = busy_fetch_wait_ms(settings)
    assert busy is not None and busy < 25
    waits: list[int] = []
    real_make_consumer = runtime.make_consumer
    monkeypatch.setattr(runtime, "make_consumer", lambda s, **o: _record_fetch_waits(real_make_consumer(s, **o), waits))
    runner = ServiceRunner(settings, EchoHandler(settings))
    running = asyncio.create_task(runner.run())
    try:
        async def until(check: Any, what: str, timeout_s: float = 30) -> None:
            deadline = time.monotonic() + timeout_s
            while not check():
                assert not running.done(), running.exception()
                assert time.monotonic() < deadline, what
                await asyncio.sleep(0.05)

        await until(lambda: runner.state.running and runner.fetch_wait is not None, "the runner never started")
        assert runner.fetch_wait is not None
        runner.fetch_wait.policy.quiet_s = 0.5
        await until(lambda: len(waits) >= 5, "no fetches")
        assert set(waits) == {25}  # idle: the usual wait
        await _produce(settings, [Note(request_id=f"n-{i}") for i in range(3)])
        await until(lambda: runner.fetch_wait is not None and runner.fetch_wait.current_ms == busy, "never switched to the short wait")
        seen = len(waits)
        await until(lambda: busy in waits[seen:], "no fetch request carried the short wait")
        await until(lambda: runner.fetch_wait is not None and runner.fetch_wait.current_ms == 25, "never went back to the usual wait")
        seen = len(waits)
        await until(lambda: len(waits) >= seen + 3, "no fetches after the quiet spell")
        assert set(waits[seen + 1:]) == {25}
    finally:
        runner.request_stop()
        await asyncio.wait_for(running, 30)


async def test_a_status_follower_waits_longer_than_a_service_on_the_embedded_broker(bus_settings, monkeypatch):
    from datacreator.bus import readback

    waits: list[int] = []
    real_make_consumer = readback.make_consumer
    monkeypatch.setattr(readback, "make_consumer", lambda s, **o: _record_fetch_waits(real_make_consumer(s, **o), waits))
    watcher = await StatusWatcher(bus_settings).start()
    producer = make_producer(bus_settings)
    await producer.start()
    try:
        status = RequestStatus(request_id="r-follow", state=RequestState.RUNNING, target_count=1)
        await producer.send_and_wait(bus_settings.topics.status, encode(status), key=b"r-follow")
        deadline = time.monotonic() + 30
        while "r-follow" not in watcher.latest or len(waits) < 3:
            assert time.monotonic() < deadline, "the status was never read"
            await asyncio.sleep(0.05)
    finally:
        await producer.stop()
        await watcher.stop()
    assert set(waits) == {FOLLOWER_FETCH_WAIT_MS}
    kafka = Settings()
    assert make_consumer(kafka, follower=True)._fetch_max_wait_ms == 500  # Kafka's own wait is longer still

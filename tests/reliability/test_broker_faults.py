"""Broker faults: restarted with empty storage while services run, and topics missing when services start.

The embedded broker keeps everything in memory, so a restart loses every topic, record, group
and committed offset. What is safe then: the services notice (commits fail with unknown topics,
fetch positions fall back), create the topics again and start their partitions over from the
new, empty logs, rebuilding their state from them (nothing). Requests in flight at the restart
are lost with the broker's data; a new request after the restart completes exactly.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from datacreator import remote
from datacreator.config import Settings
from datacreator.contracts import RequestState, RequestStatus
from datacreator.embedded.broker import EmbeddedBroker
from datacreator.serve import ServiceGroup
from datacreator.stack import LLMTarget, endpoint_json
from tests.fixtures.broker import unique_topics
from tests.helpers import records_of
from tests.reliability.common import fault_settings, mcq_request
from tests.reliability.ledger import check_accounting, check_examples, read_ledger, settled_status, summary
from tests.reliability.procs import record_faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def _topics(settings: Settings) -> dict[str, int]:
    """Topic name -> partition count, as the broker has them now."""
    admin = AIOKafkaAdminClient(**settings.kafka_kwargs(), request_timeout_ms=3000)
    await admin.start()
    try:
        names = [n for n in await admin.list_topics() if n in settings.topics.all()]
        if not names:
            return {}
        described = await admin.describe_topics(names)
        return {t["topic"]: len(t["partitions"]) for t in described if not t.get("error_code")}
    finally:
        await admin.close()


async def _wait_topics(settings: Settings, timeout_s: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    found: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            found = await _topics(settings)
        except Exception:  # the broker is coming back
            found = {}
        if set(found) == set(settings.topics.all()):
            return found
        await asyncio.sleep(0.25)
    raise AssertionError(f"topics not recreated within {timeout_s} s: have {sorted(found)}")


async def _statuses(settings: Settings, request_id: str) -> list[RequestStatus]:
    return await records_of(settings, settings.topics.status, RequestStatus, request_id)


# Producers still under way when the broker comes back may recreate a topic before the services
# do: Tansu then creates it with its default partition count (4). With that count the topics match.
TANSU_DEFAULT_PARTITIONS = 4


async def test_broker_restart_with_empty_storage(fresh_broker, make_simulator):
    sim = make_simulator(latency_s=0.2, seed=11)
    settings = await fault_settings(fresh_broker, sim.base_url, partitions=TANSU_DEFAULT_PARTITIONS)
    group = await ServiceGroup(settings).start()
    try:
        lost = mcq_request(400, examples_per_call=5, chains=2)
        await remote.submit(settings, lost)
        deadline = time.monotonic() + 20
        while (await remote.latest_status(settings, lost.request_id) or RequestStatus(request_id="-", state=RequestState.ACCEPTED)).accepted < 20:
            assert time.monotonic() < deadline, "the first request made no progress"
            await asyncio.sleep(0.2)

        await fresh_broker.restart()  # memory storage: comes back with nothing
        topics = await _wait_topics(settings, 30)
        assert set(topics.values()) == {settings.kafka.topic_partitions}, topics
        await asyncio.sleep(1.0)
        assert group._task is not None and not group._task.done(), "the services stopped after the restart"

        fresh = mcq_request(40, examples_per_call=5, chains=2)
        await remote.submit(settings, fresh)
        final = await remote.wait_for_final(settings, fresh.request_id, timeout_s=40)
        assert final.state == RequestState.COMPLETED, final.error
        final = await settled_status(settings, fresh.request_id)
        ledger = await asyncio.wait_for(read_ledger(settings, fresh.request_id), 30)
        check_examples(ledger, fresh.target_count)
        fold = check_accounting(ledger, final)

        # The request under way at the restart: its records went with the broker, no service holds it now.
        orphan = await asyncio.wait_for(read_ledger(settings, lost.request_id), 30)
        lost_statuses = await asyncio.wait_for(_statuses(settings, lost.request_id), 30)
        assert all(s.state != RequestState.COMPLETED for s in lost_statuses)
        assert len(orphan.duplicated_ids()) == 0
        record_faults("test_broker_restart", "broker restarted with empty storage mid-request", 1, {
            **summary(ledger, final, fold),
            "request_in_flight": "lost with the broker's data",
            "in_flight_examples_after_restart": len(orphan.examples),
            "in_flight_statuses_after_restart": [s.state.value for s in lost_statuses][-1:],
        })
    finally:
        await asyncio.wait_for(group.stop(), 40)


async def test_services_create_missing_topics_at_start(fresh_broker, make_simulator):
    sim = make_simulator(latency_s=0.02, seed=12)
    settings = Settings(
        kafka_bootstrap=fresh_broker.bootstrap, topics=unique_topics(), topic_partitions=3, kafka_client_overrides=EmbeddedBroker.client_overrides(),
        kafka_session_timeout_ms=2000, kafka_heartbeat_interval_ms=500,
        endpoints_json=endpoint_json(LLMTarget(sim.base_url, "datacreator-simulator")),
    )
    assert await _topics(settings) == {}
    group = await ServiceGroup(settings).start()
    try:
        topics = await _topics(settings)
        assert topics == {name: 3 for name in settings.topics.all()}
        request = mcq_request(25)
        await remote.submit(settings, request)
        final = await remote.wait_for_final(settings, request.request_id, timeout_s=30)
        assert final.state == RequestState.COMPLETED, final.error
        check_examples(await read_ledger(settings, request.request_id), 25)
        record_faults("test_missing_topics", "topics missing when services start", len(topics), {"state": final.state.value})
    finally:
        await group.stop()

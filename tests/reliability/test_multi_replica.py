"""Replicas in their consumer groups: 2 planners, 3 generators, 2 curators as OS processes, 6 partitions.

The partitions are spread evenly over the replicas of each service (read from each process's
consumer-lag gauge, which carries one label per partition it holds). One replica of each service
is SIGKILLed mid-request and not restarted: the survivors take its partitions over and the
request ends with exactly target_count distinct examples, none published twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from datacreator import remote
from datacreator.contracts import RequestState
from tests.reliability.common import fault_settings, mcq_request
from tests.reliability.ledger import check_accounting, check_examples, read_ledger, settled_status, summary
from tests.reliability.procs import Fleet, ServiceProcess, record_faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

PARTITIONS = 6
REPLICAS = {"planner": 2, "generator": 3, "curator": 2}
SEED = 6


def _input_topic(settings, service: str) -> str:  # type: ignore[no-untyped-def]
    topics = settings.topics
    return {"planner": topics.outcomes, "generator": topics.tasks, "curator": topics.candidates}[service]


async def _assignments(settings, procs: list[ServiceProcess], service: str, timeout_s: float) -> dict[str, set[int]]:  # type: ignore[no-untyped-def]
    """Partitions each live replica holds, once together they hold all of them exactly once."""
    topic = _input_topic(settings, service)
    deadline = time.monotonic() + timeout_s
    held: dict[str, set[int]] = {}
    while time.monotonic() < deadline:
        held = {}
        for proc in procs:
            if proc.alive:
                held[proc.label] = await proc.assigned(topic)
        together = [p for parts in held.values() for p in parts]
        if sorted(together) == list(range(PARTITIONS)):
            return held
        await asyncio.sleep(0.25)
    raise AssertionError(f"{service}: partitions of {topic} not covered exactly once: {held}")


def _balanced(held: dict[str, set[int]]) -> bool:
    sizes = [len(parts) for parts in held.values()]
    return max(sizes) - min(sizes) <= 1


async def test_replicas_share_partitions_and_survive_a_kill_each(fresh_broker, make_simulator, tmp_path: Path):
    sim = make_simulator(latency_s=0.4, seed=SEED)
    settings = await fault_settings(fresh_broker, sim.base_url, partitions=PARTITIONS)
    fleet = Fleet(settings, tmp_path, generator_replicas=REPLICAS["generator"])
    for service, count in REPLICAS.items():
        fleet.add(service, count)
    rng = random.Random(SEED)
    try:
        await fleet.start_all(timeout_s=60)
        before = {s: await _assignments(settings, fleet.by_service(s), s, 30) for s in REPLICAS}
        for service, held in before.items():
            assert len(held) == REPLICAS[service], (service, held)
            assert _balanced(held), f"{service}: unbalanced {held}"
            assert all(held.values()), f"{service}: a replica holds nothing: {held}"

        request = mcq_request(2000, examples_per_call=10, chains=16)
        await remote.submit(settings, request)
        await asyncio.sleep(3.0)  # mid-way: a few hundred examples in
        victims = {s: rng.choice(fleet.by_service(s)) for s in REPLICAS}
        for victim in victims.values():
            victim.kill()
        for victim in victims.values():
            assert await victim.wait_exit(5) is not None

        after = {s: await _assignments(settings, fleet.by_service(s), s, 40) for s in REPLICAS}
        final = await remote.wait_for_final(settings, request.request_id, timeout_s=90)
        assert final.state == RequestState.COMPLETED, final.error
        for service, held in after.items():
            assert victims[service].label not in held
            assert _balanced(held), f"{service}: unbalanced after the kill: {held}"
        final = await settled_status(settings, request.request_id)
        ledger = await read_ledger(settings, request.request_id)
        check_examples(ledger, request.target_count)
        fold = check_accounting(ledger, final)
        record_faults(
            "test_multi_replica", "SIGKILL one replica of each service (2 planners, 3 generators, 2 curators)", len(victims),
            {**summary(ledger, final, fold),
             "before": {s: {k: sorted(v) for k, v in h.items()} for s, h in before.items()},
             "after": {s: {k: sorted(v) for k, v in h.items()} for s, h in after.items()}},
        )
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        await fleet.stop_all()

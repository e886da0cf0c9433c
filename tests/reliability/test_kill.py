"""SIGKILL every service, several times during one request, and restart it: nothing is lost or repeated.

Each service runs as its own OS process. A seeded schedule picks which service to kill and when;
the killed process gets no chance to commit, leave its group or flush anything, and is started
again at once. The request must still complete with exactly target_count distinct examples, no
example published twice, a status that is the fold of the task outcomes, and a sink whose files
hold each example once.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter
from pathlib import Path

import pytest

from datacreator import remote
from datacreator.contracts import RequestState
from tests.reliability.common import fault_settings, mcq_request, sink_rows, wait_until
from tests.reliability.ledger import check_accounting, check_examples, read_ledger, settled_status, summary
from tests.reliability.procs import Fleet, ServiceProcess, record_faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SEED = 20231
SERVICES = ("planner", "generator", "curator", "sink")
ROUNDS = 2  # every service is killed this many times, in a seeded order


async def _kill_loop(procs: dict[str, ServiceProcess], schedule: list[str], rng: random.Random,
                     done: asyncio.Event, killed: Counter[str]) -> None:
    for service in schedule:
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        if done.is_set():
            return
        proc = procs[service]
        proc.kill(signal.SIGKILL)
        assert await proc.wait_exit(5) is not None
        killed[service] += 1
        proc.start()
        await proc.wait_ready(40)


async def test_sigkill_each_service_during_one_request(fresh_broker, make_simulator, tmp_path: Path):
    sim = make_simulator(latency_s=0.25, seed=SEED)
    settings = await fault_settings(fresh_broker, sim.base_url)
    sink_dir = tmp_path / "sink"
    fleet = Fleet(settings, tmp_path, sink_dir=sink_dir)
    procs = {service: fleet.add(service)[0] for service in SERVICES}
    rng = random.Random(SEED)
    schedule = [s for _ in range(ROUNDS) for s in rng.sample(SERVICES, len(SERVICES))]
    killed: Counter[str] = Counter()
    done = asyncio.Event()
    try:
        await fleet.start_all()
        request = mcq_request(400, examples_per_call=5, chains=2)
        await remote.submit(settings, request)
        killer = asyncio.create_task(_kill_loop(procs, schedule, rng, done, killed))
        try:
            final = await remote.wait_for_final(settings, request.request_id, timeout_s=90)
        finally:
            done.set()
            await killer
        assert final.state == RequestState.COMPLETED, final.error
        final = await settled_status(settings, request.request_id)
        ledger = await read_ledger(settings, request.request_id)
        check_examples(ledger, request.target_count)
        fold = check_accounting(ledger, final)
        assert sum(killed.values()) >= len(SERVICES), f"the request ended before every service was killed: {dict(killed)}"

        # The sink (killed too) ends with every example once.
        rows = await wait_until(lambda: len(set(sink_rows(sink_dir, request.request_id))) >= request.target_count, 30)
        ids = sink_rows(sink_dir, request.request_id)
        assert rows, f"the sink wrote {len(set(ids))} of {request.target_count}"
        assert set(ids) == set(ledger.example_ids)
        assert len(ids) == len(set(ids)), "the sink wrote an example twice"
        record_faults("test_kill", "SIGKILL + restart, one process per service", sum(killed.values()),
                      {"by_service": dict(killed), **summary(ledger, final, fold), "sink_rows": len(ids)})
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        done.set()
        await fleet.stop_all()

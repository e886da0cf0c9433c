"""SIGTERM: a service finishes (or hands back) what it holds, commits, and exits within shutdown_timeout_s.

Every service is stopped with SIGTERM during one request and started again. A clean stop leaves
nothing to redo, so besides the usual exact checks no candidate is curated twice and no task
copy is answered twice. A second case holds LLM answers longer
than the shutdown timeout: the generator gives its tasks back uncommitted and exits on time, and
the next generator answers them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from datacreator import remote
from datacreator.bus.codec import decode
from datacreator.bus.readback import read_to_end
from datacreator.contracts import Candidate, GenerationTask, RequestState
from tests.reliability.common import fault_settings, mcq_request
from tests.reliability.ledger import check_accounting, check_examples, read_ledger, settled_status, summary
from tests.reliability.procs import Fleet, record_faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# Joining the group again after a clean leave, plus the process start: the bound on exit itself is tighter.
EXIT_SLACK_S = 5.0


async def _task_counts(settings, request_id: str) -> tuple[Counter[str], Counter[str]]:  # type: ignore[no-untyped-def]
    tasks: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    async for record in read_to_end(settings, settings.topics.tasks):
        task = decode(GenerationTask, record.value)
        if task.request_id == request_id:
            tasks[task.task_id] += 1
    async for record in read_to_end(settings, settings.topics.candidates):
        candidate = decode(Candidate, record.value)
        if candidate.task.request_id == request_id:
            answers[candidate.task.task_id] += 1
    return tasks, answers


async def test_sigterm_each_service_then_restart(fresh_broker, make_simulator, tmp_path: Path):
    sim = make_simulator(latency_s=0.3, seed=7)
    settings = await fault_settings(fresh_broker, sim.base_url)
    fleet = Fleet(settings, tmp_path)
    procs = {service: fleet.add(service)[0] for service in ("planner", "generator", "curator")}
    exits: dict[str, tuple[int | None, float]] = {}
    try:
        await fleet.start_all()
        request = mcq_request(240, examples_per_call=5, chains=3)
        await remote.submit(settings, request)
        for service, proc in procs.items():
            await asyncio.sleep(1.0)
            exits[service] = await proc.terminate(settings.runtime.shutdown_timeout_s + EXIT_SLACK_S)
            proc.start()
            await proc.wait_ready(40)
        final = await remote.wait_for_final(settings, request.request_id, timeout_s=60)
        for service, (code, seconds) in exits.items():
            assert code == 0, f"{service} exited with {code} after SIGTERM"
            assert seconds <= settings.runtime.shutdown_timeout_s + EXIT_SLACK_S, f"{service} took {seconds:.1f} s to exit"
        assert final.state == RequestState.COMPLETED, final.error
        final = await settled_status(settings, request.request_id)
        ledger = await read_ledger(settings, request.request_id)
        check_examples(ledger, request.target_count)
        fold = check_accounting(ledger, final)
        # Committed on the way out: no candidate was curated twice (a second curation of the same
        # candidate repeats its outcome exactly) and no task copy was answered twice (the planner
        # sends its tasks in flight again when it takes a request over: each copy is answered at most once).
        curated = Counter(
            (o.task_id, tuple(a.example_id for a in o.accepted), tuple(sorted(o.rejected.items())), o.usage.total_tokens, o.latency_s)
            for o in ledger.outcomes
        )
        assert max(curated.values()) == 1, "a candidate was curated twice: the curator's offsets were not committed"
        tasks, answers = await _task_counts(settings, request.request_id)
        over = {t: (answers[t], tasks[t]) for t in answers if answers[t] > tasks[t]}
        assert not over, f"tasks answered more often than published (answers, copies): {over}"
        record_faults("test_sigterm", "SIGTERM + restart, each service once", len(exits),
                      {**summary(ledger, final, fold), "exit_s": {s: round(t, 2) for s, (_, t) in exits.items()},
                       "tasks_republished_by_planner": sum(n - 1 for n in tasks.values())})
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        await fleet.stop_all()


async def test_sigterm_with_calls_longer_than_the_shutdown_timeout(fresh_broker, make_simulator, tmp_path: Path):
    """Answers take 4 s, the shutdown timeout is 1 s: the generator exits on time and its tasks are answered later."""
    sim = make_simulator(latency_s=4.0, seed=8)
    settings = await fault_settings(fresh_broker, sim.base_url)
    settings = settings.with_updates(shutdown_timeout_s=1.0)
    fleet = Fleet(settings, tmp_path)
    for service in ("planner", "curator"):
        fleet.add(service)
    (generator,) = fleet.add("generator")
    try:
        await fleet.start_all()
        request = mcq_request(20, examples_per_call=5, chains=2)
        await remote.submit(settings, request)
        await asyncio.sleep(2.0)  # two calls under way, none answered
        code, seconds = await generator.terminate(settings.runtime.shutdown_timeout_s + EXIT_SLACK_S)
        assert code == 0, generator.log_tail()
        assert seconds <= settings.runtime.shutdown_timeout_s + EXIT_SLACK_S, f"the generator took {seconds:.1f} s to exit"
        generator.start()
        final = await remote.wait_for_final(settings, request.request_id, timeout_s=50)
        assert final.state == RequestState.COMPLETED, final.error
        final = await settled_status(settings, request.request_id)
        ledger = await read_ledger(settings, request.request_id)
        check_examples(ledger, request.target_count)
        fold = check_accounting(ledger, final)
        record_faults("test_sigterm_slow_calls", "SIGTERM with LLM calls longer than shutdown_timeout_s", 1,
                      {**summary(ledger, final, fold), "exit_s": round(seconds, 2)})
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        await fleet.stop_all()

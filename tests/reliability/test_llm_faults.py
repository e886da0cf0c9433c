"""Faults of the LLM endpoint (from the simulator), services in-process: requests complete, or fail with a reason.

Each case counts what the simulator injected (its own fault counters), so the report states how
often each fault happened, and the bus is read back for the same exact checks as the crash tests.
"""

from __future__ import annotations

import asyncio

import pytest

from datacreator import remote
from datacreator.contracts import RequestState
from datacreator.serve import ServiceGroup
from tests.reliability.common import fault_settings, mcq_request
from tests.reliability.ledger import check_accounting, check_examples, read_ledger, settled_status, summary
from tests.reliability.procs import record_faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


async def _run(settings, target: int, during=None, timeout_s: float = 45, **fields):  # type: ignore[no-untyped-def]
    """Submit a request to in-process services; its settled status and ledger, read while they still run."""
    group = await ServiceGroup(settings).start()
    try:
        request = mcq_request(target, **fields)
        await remote.submit(settings, request)
        side = asyncio.create_task(during()) if during else None
        try:
            await remote.wait_for_final(settings, request.request_id, timeout_s=timeout_s)
        finally:
            if side is not None:
                side.cancel()
                await asyncio.gather(side, return_exceptions=True)
        final = await settled_status(settings, request.request_id)
        return request, final, await read_ledger(settings, request.request_id)
    finally:
        await group.stop()


def _complete_exactly(request, final, ledger, test: str, fault: str, injected: int) -> None:  # type: ignore[no-untyped-def]
    assert final.state == RequestState.COMPLETED, final.error
    check_examples(ledger, request.target_count)
    fold = check_accounting(ledger, final)
    record_faults(test, fault, injected, summary(ledger, final, fold))


async def test_429_storm_then_steady_429s(fresh_broker, make_simulator):
    """Every call refused for 2 s (Retry-After 1 s), then a third of them: the retries ride it out."""
    sim = make_simulator(storm_429_rate=1.0, storm_retry_after_s=1, latency_s=0.02, seed=1)
    settings = await fault_settings(fresh_broker, sim.base_url)

    async def calm_down() -> None:
        await asyncio.sleep(2.0)
        sim.configure(storm_429_rate=0.3)

    request, final, ledger = await _run(settings, 60, during=calm_down)
    refused = sim.stats.status(429)
    assert refused >= 4, sim.stats.snapshot()
    _complete_exactly(request, final, ledger, "test_429_storm", "HTTP 429 (2 s storm, then 30%)", refused)


async def test_one_in_five_calls_fails_with_5xx(fresh_broker, make_simulator):
    sim = make_simulator(error_rate=0.2, latency_s=0.02, seed=2)
    settings = await fault_settings(fresh_broker, sim.base_url)
    request, final, ledger = await _run(settings, 150)
    failed = sim.stats.status(500) + sim.stats.status(503)
    assert failed >= 3, sim.stats.snapshot()
    _complete_exactly(request, final, ledger, "test_5xx", "HTTP 500/503 on 20% of calls", failed)


async def test_read_timeouts(fresh_broker, make_simulator):
    """Some answers are held for 3 s while the client reads for 1 s: those calls time out and are retried."""
    sim = make_simulator(timeout_rate=0.15, timeout_hold_s=3.0, latency_s=0.02, seed=3)
    settings = await fault_settings(fresh_broker, sim.base_url, read_timeout_s=1.0, total_timeout_s=20.0)
    request, final, ledger = await _run(settings, 100)
    held = sim.stats.timeouts_held
    assert held >= 1, sim.stats.snapshot()
    _complete_exactly(request, final, ledger, "test_timeouts", "read timeout (answer held 3 s, client reads 1 s)", held)


async def test_malformed_and_wrong_structure_output(fresh_broker, make_simulator):
    """30% of answers are not JSON and 30% of items have the wrong structure: they are rejected, counted, replaced."""
    sim = make_simulator(malformed_rate=0.3, wrong_structure_rate=0.3, latency_s=0.02, seed=4)
    settings = await fault_settings(fresh_broker, sim.base_url)
    request, final, ledger = await _run(settings, 80)
    faults = sim.stats.snapshot()["faults"]
    injected = sum(faults.values())
    assert injected >= 5, faults
    rejected = final.rejected
    assert rejected.get("unparseable", 0) + rejected.get("structure_mismatch", 0) > 0, rejected
    _complete_exactly(request, final, ledger, "test_malformed", "malformed answers 30% + wrong-structure items 30%", injected)


async def test_a_model_that_only_copies_fails_with_a_reason(fresh_broker, make_simulator):
    sim = make_simulator(copy_rate=1.0, latency_s=0.01, seed=5)
    settings = await fault_settings(fresh_broker, sim.base_url)
    settings = settings.with_updates(stall_calls=12)
    request, final, ledger = await _run(settings, 30, timeout_s=40)
    assert final.state == RequestState.FAILED
    assert "copy_of_reference" in (final.error or ""), final.error
    assert final.accepted == 0
    assert not ledger.examples
    fold = check_accounting(ledger, final)
    record_faults("test_copies", "model copies the formatting example (100%)", sum(final.rejected.values()),
                  {**summary(ledger, final, fold), "error": final.error})

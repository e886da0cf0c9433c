"""The planner on the real broker: every strategy end to end with lineage, exact targets under
rejections, budgets, stalls, cancellation, a SIGKILLed planner that resumes from its snapshots,
and fairness between requests. The generator and curator run for real, the LLM is the simulator.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict

import pytest
import pytest_asyncio

from datacreator import remote
from datacreator.bus.admin import ensure_topics
from datacreator.config import Settings
from datacreator.contracts import Budget, CreationRequest, Example, ModelSpec, RequestState, Strategy
from datacreator.embedded.broker import EmbeddedBroker
from datacreator.serve import ServiceGroup
from datacreator.stack import LLMTarget, endpoint_json
from tests.fixtures.broker import unique_topics
from tests.helpers import MCQ, MCQ_INSTRUCTION, example_records

# Short group timings: joins and rebalances on the embedded broker scale with the session timeout.
FAST_GROUPS = {"kafka_session_timeout_ms": 3000, "kafka_heartbeat_interval_ms": 500}


def _settings(base: Settings, sim, **endpoint_options) -> Settings:
    target = LLMTarget(sim.base_url, "datacreator-simulator")
    return base.with_updates(endpoints_json=endpoint_json(target, **endpoint_options), status_interval_s=0.2, **FAST_GROUPS)


def _request(**fields) -> CreationRequest:
    values = dict(instruction=MCQ_INSTRUCTION, formatting_example=MCQ, target_count=20, examples_per_call=4, chains=3)
    values.update(fields)
    return CreationRequest(**values)


@pytest_asyncio.fixture(loop_scope="session")
async def running(bus_settings, make_simulator):
    """`await running(**simulator_config)` starts a simulator and the three services; all stop after the test."""
    groups: list[ServiceGroup] = []

    async def start(endpoint_options: dict | None = None, settings_changes: dict | None = None, **sim_config) -> Settings:
        settings = _settings(bus_settings, make_simulator(**sim_config), **(endpoint_options or {}))
        if settings_changes:
            settings = settings.with_updates(**settings_changes)
        groups.append(await ServiceGroup(settings).start())
        return settings

    yield start
    for group in groups:
        await group.stop()


def _check_lineage(examples: list[Example], request: CreationRequest) -> None:
    by_id = {e.example_id: e for e in examples}
    for example in examples:
        assert example.strategy == request.strategy
        assert len(example.reference_ids) == 1
        for ref in example.reference_ids:
            assert ref is None or ref in by_id, f"reference {ref} of {example.example_id} is not in the output"

    if request.strategy is Strategy.none:
        assert all(e.reference_ids == [None] for e in examples)
        return
    if request.strategy is Strategy.tree:
        # Levels from `step`: level 1 comes from the seed, level k+1 from nodes of level k.
        for example in examples:
            ref = example.reference_ids[0]
            if example.step == 1:
                assert ref is None
            else:
                assert ref is not None and by_id[ref].step == example.step - 1
        # Kept children (the nodes expanded further) of each node: at most tree_branching.
        expanded = {e.reference_ids[0] for e in examples if e.reference_ids[0] is not None}
        kept = Counter(by_id[node].reference_ids[0] for node in expanded)
        assert kept and max(kept.values()) <= request.tree_branching
        assert max(e.step for e in examples) >= 3, "the tree grew past its second level"
        return
    # Chains: a reference is an earlier call's example of the same chain (or the seed).
    for example in examples:
        ref = example.reference_ids[0]
        if ref is not None:
            parent = by_id[ref]
            assert parent.chain == example.chain and parent.step < example.step
    assert any(e.reference_ids[0] is not None for e in examples), "self-reference was used"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(Strategy))
async def test_each_strategy_completes_with_lineage(running, strategy):
    settings = await running()
    request = _request(strategy=strategy, tree_branching=2)
    await remote.submit(settings, request)
    final = await remote.wait_for_final(settings, request.request_id, timeout_s=40)
    assert final.state is RequestState.COMPLETED, final.error
    assert final.accepted == request.target_count

    examples = await example_records(settings, request.request_id)
    ids = {e.example_id for e in examples}
    assert len(ids) == request.target_count  # exactly: no overshoot, nothing missing
    _check_lineage(list({e.example_id: e for e in examples}.values()), request)


@pytest.mark.slow
async def test_exact_target_under_a_high_rejection_rate(running):
    # Rates and target high enough that each kind of rejection shows up among the items curated
    # before the target is met, whatever order the calls end in (at 0.15 and 25 examples, a run
    # without a single structure mismatch was about one in ten).
    settings = await running(wrong_structure_rate=0.25, label_out_of_space_rate=0.25, seed=7)
    request = _request(target_count=30, examples_per_call=5)
    await remote.submit(settings, request)
    final = await remote.wait_for_final(settings, request.request_id, timeout_s=40)
    assert final.state is RequestState.COMPLETED, final.error
    assert final.rejected.get("structure_mismatch", 0) > 0 and final.rejected.get("label_out_of_space", 0) > 0
    ids = {e.example_id for e in await example_records(settings, request.request_id)}
    assert len(ids) == 30


async def test_call_budget_stops_with_what_was_made(running):
    settings = await running()
    request = _request(target_count=200, examples_per_call=5, chains=2, budget=Budget(max_llm_calls=3))
    await remote.submit(settings, request)
    final = await remote.wait_for_final(settings, request.request_id, timeout_s=30)
    assert final.state is RequestState.BUDGET_EXHAUSTED
    assert final.llm_calls == 3 and final.tasks_in_flight == 0
    examples = await example_records(settings, request.request_id)
    assert 0 < final.accepted < 200
    assert len({e.example_id for e in examples}) == final.accepted


async def test_cost_budget_stops_with_what_was_made(running):
    # Prices make one simulator call cost a few cents (a few hundred tokens at $100 per million);
    # its worst case (whole prompt, max_tokens, both attempts) is reserved before it is issued.
    settings = await running(endpoint_options={"input_price_per_1m": 100.0, "output_price_per_1m": 100.0, "max_attempts": 2})
    request = _request(target_count=500, examples_per_call=5, chains=2, budget=Budget(max_cost_usd=1.0),
                       model=ModelSpec(max_tokens=256))
    await remote.submit(settings, request)
    final = await remote.wait_for_final(settings, request.request_id, timeout_s=30)
    assert final.state is RequestState.BUDGET_EXHAUSTED, final.error
    assert 0 < final.cost_usd <= 1.0 and final.llm_calls >= 2 and final.accepted < 500
    assert f"${final.cost_usd:.4f}" in final.error
    examples = await example_records(settings, request.request_id)
    assert len({e.example_id for e in examples}) == final.accepted


async def test_copying_model_fails_as_stalled(running):
    settings = await running(settings_changes={"stall_calls": 4}, copy_rate=1.0)
    request = _request(target_count=20, chains=2)
    await remote.submit(settings, request)
    final = await remote.wait_for_final(settings, request.request_id, timeout_s=30)
    assert final.state is RequestState.FAILED
    assert "copy_of_reference" in (final.error or "")
    assert final.accepted == 0 and 4 <= final.llm_calls <= 4 + request.chains
    assert await example_records(settings, request.request_id) == []


@pytest.mark.slow
async def test_cancel_stops_and_drops_work_in_flight(running):
    settings = await running(latency_s=0.05)
    request = _request(target_count=100_000, examples_per_call=5, chains=4)
    await remote.submit(settings, request)
    await remote.wait_for_status(settings, request.request_id, lambda s: s.accepted >= 20, timeout_s=30)
    await remote.cancel(settings, request.request_id, reason="enough for now")
    final = await remote.wait_for_final(settings, request.request_id, timeout_s=20)
    assert final.state is RequestState.CANCELLED and final.error == "enough for now"

    await asyncio.sleep(1.0)  # let what was already on its way settle
    settled = {e.example_id for e in await example_records(settings, request.request_id)}
    await asyncio.sleep(2.0)
    later = {e.example_id for e in await example_records(settings, request.request_id)}
    assert later == settled and len(settled) < request.target_count
    after = await remote.latest_status(settings, request.request_id)
    assert after is not None and after.state is RequestState.CANCELLED


@pytest.mark.slow
async def test_small_requests_finish_while_a_big_one_runs(running):
    settings = await running(latency_s=0.05)
    big = _request(target_count=100_000, examples_per_call=5, chains=4)
    small = [_request(target_count=10, examples_per_call=5, chains=2) for _ in range(3)]
    await remote.submit(settings, big)
    await remote.wait_for_status(settings, big.request_id, lambda s: s.accepted > 0, timeout_s=30)
    for request in small:
        await remote.submit(settings, request)
    finals = await asyncio.gather(*(remote.wait_for_final(settings, r.request_id, timeout_s=30) for r in small))
    assert all(f.state is RequestState.COMPLETED and f.accepted == 10 for f in finals)
    big_now = await remote.latest_status(settings, big.request_id)
    assert big_now is not None and not big_now.state.final and big_now.accepted < big.target_count
    await remote.cancel(settings, big.request_id)
    await remote.wait_for_final(settings, big.request_id, timeout_s=20)


# -- a planner process killed mid-request ------------------------------------------------------


def _service_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATACREATOR_KAFKA_BOOTSTRAP=settings.kafka.bootstrap,
        DATACREATOR_KAFKA_CLIENT_OVERRIDES=json.dumps(EmbeddedBroker.client_overrides()),
        DATACREATOR_TOPIC_PARTITIONS=str(settings.kafka.topic_partitions),
        DATACREATOR_ENDPOINTS_JSON=settings.endpoints_json or "",
        DATACREATOR_HTTP_PORT="0",
        DATACREATOR_STATUS_INTERVAL_S=str(settings.planner.status_interval_s),
        DATACREATOR_KAFKA_SESSION_TIMEOUT_MS=str(settings.kafka.session_timeout_ms),
        DATACREATOR_KAFKA_HEARTBEAT_INTERVAL_MS=str(settings.kafka.heartbeat_interval_ms),
        DATACREATOR_LOG_LEVEL="INFO",
    )
    for field, topic in settings.topics.model_dump().items():
        env[f"DATACREATOR_TOPICS__{field.upper()}"] = topic
    return env


def _start_planner(settings: Settings, log_path) -> subprocess.Popen:
    log = open(log_path, "wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "datacreator.cli", "serve", "planner"],
            env=_service_env(settings), stdout=log, stderr=subprocess.STDOUT,
        )
    finally:
        log.close()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


@pytest.mark.slow
async def test_killed_planner_resumes_from_its_snapshots(fresh_broker, make_simulator, tmp_path):
    base = Settings(kafka_bootstrap=fresh_broker.bootstrap, topics=unique_topics(), topic_partitions=3,
                    kafka_client_overrides=EmbeddedBroker.client_overrides())
    await ensure_topics(base)
    settings = _settings(base, make_simulator(latency_s=0.25))
    workers = await ServiceGroup(settings, ["generator", "curator"]).start()
    first = _start_planner(settings, tmp_path / "planner-1.log")
    second: subprocess.Popen | None = None
    try:
        request = _request(target_count=60, examples_per_call=3, chains=2)
        await remote.submit(settings, request)
        before = await remote.wait_for_status(settings, request.request_id, lambda s: s.accepted >= 12, timeout_s=30)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        mid = await remote.latest_status(settings, request.request_id)
        assert mid is not None and not mid.state.final, "killed before the request could finish"

        second = _start_planner(settings, tmp_path / "planner-2.log")
        final = await remote.wait_for_final(settings, request.request_id, timeout_s=40)
        assert final.state is RequestState.COMPLETED, final.error
        assert final.accepted == 60
        assert final.started_at == before.started_at, "the plan was resumed, not started again"
        assert final.llm_calls >= mid.llm_calls

        examples = await example_records(settings, request.request_id)
        assert len({e.example_id for e in examples}) == 60  # nothing beyond the target
        chains = defaultdict(list)
        for example in examples:
            chains[example.chain].append(example.step)
        assert set(chains) <= set(range(request.chains))
        log_text = (tmp_path / "planner-2.log").read_text()
        assert "resumed 1 requests" in log_text, log_text[-2000:]
    finally:
        _stop(first)
        if second is not None:
            _stop(second)
        await workers.stop()


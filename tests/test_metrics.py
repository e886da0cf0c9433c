"""Metrics follow an end-to-end run: every counter rises by what the bus and the LLM saw.

The Prometheus registry is process-wide and other tests use it too, so every check is a
difference between a scrape before the request and one after the stack has gone quiet.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections import Counter

import httpx
import pytest

from datacreator import remote
from datacreator.bus.codec import decode
from datacreator.bus.readback import read_to_end
from datacreator.config import TopicNames
from datacreator.contracts import CreationRequest, Rejection, RejectReason, RequestState, Strategy
from datacreator.serve import ServiceGroup
from datacreator.stack import LLMTarget, endpoint_json
from datacreator.top import MetricsSnapshot, scrape
from tests.helpers import MCQ

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
P = "datacreator_"
INPUT_PRICE, OUTPUT_PRICE = 3.0, 15.0  # USD per million tokens



def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=20)


async def settled(url: str, topics: TopicNames, quiet_s: float = 1.0, timeout_s: float = 20.0) -> MetricsSnapshot:
    """Scrape until nothing is in flight, no consumer of `topics` lags, and the counters stop moving."""
    deadline = time.monotonic() + timeout_s
    last: list[tuple] | None = None
    since = time.monotonic()
    while True:
        snap = await scrape([url])
        lag = sum(snap.total(P + "consumer_lag_messages", topic=t) for t in topics.model_dump().values())
        busy = snap.total(P + "in_flight_messages") + snap.total(P + "llm_in_flight_calls") + lag
        key = sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in snap.samples
                     if s.name.startswith(P) and s.name.endswith("_total"))
        if busy or key != last:
            last, since = key, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return snap
        if time.monotonic() > deadline:
            raise TimeoutError(f"metrics still moving after {timeout_s}s")
        await asyncio.sleep(0.25)


async def faults_in_turn(sim) -> None:
    """A 429 storm, then server errors, each until the simulator has answered one (so both surely occur)."""
    sim.configure(storm_429_rate=1.0)
    while sim.stats.status(429) == 0:
        await asyncio.sleep(0.005)
    sim.configure(storm_429_rate=0.0, error_rate=1.0)
    while sim.stats.status(500) + sim.stats.status(503) == 0:
        await asyncio.sleep(0.005)
    sim.configure(error_rate=0.0)


async def fetch(url: str) -> str:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(url)
        response.raise_for_status()
        return response.text


async def scrape_registry() -> MetricsSnapshot:
    """This process's registry as text, read back the way a scrape would."""
    from prometheus_client import REGISTRY, generate_latest

    return MetricsSnapshot.parse(generate_latest(REGISTRY).decode())


def delta(after: MetricsSnapshot, before: MetricsSnapshot, name: str, **labels: str) -> float:
    return after.total(name, **labels) - before.total(name, **labels)


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_counters_match_what_the_bus_and_the_llm_saw(bus_settings, make_simulator):
    sim = make_simulator(wrong_structure_rate=0.15, copy_rate=0.1, malformed_rate=0.1, seed=7)
    target = LLMTarget(sim.base_url, "datacreator-simulator")
    settings = bus_settings.with_updates(
        endpoints_json=endpoint_json(target, input_price_per_1m=INPUT_PRICE, output_price_per_1m=OUTPUT_PRICE),
    )
    topics = settings.topics
    group = await ServiceGroup(settings).start()
    try:
        url = f"{group.health.url}/metrics"
        before = await scrape([url])
        assert not before.errors
        request = CreationRequest(
            instruction="Create commonsense multiple-choice questions with options A to D.",
            formatting_example=MCQ, target_count=20, examples_per_call=5, strategy=Strategy.random, chains=3,
        )
        faults = asyncio.create_task(faults_in_turn(sim))
        await remote.submit(settings, request)
        final = await remote.wait_for_final(settings, request.request_id, timeout_s=60)
        await asyncio.wait_for(faults, 1)
        assert final.state == RequestState.COMPLETED, final.error
        after = await settled(url, topics)
        text = await fetch(url)
    finally:
        await group.stop()

    # Examples: exactly the target, as published.
    assert delta(after, before, P + "examples_accepted_total") == 20
    assert delta(after, before, P + "messages_produced_total", service="curator", topic=topics.examples) == 20

    # Rejections by reason: the same as the rejected topic holds.
    on_topic = Counter()
    async for record in read_to_end(settings, topics.rejected):
        on_topic[decode(Rejection, record.value).reason.value] += 1
    assert sum(on_topic.values()) > 0, "the injected faults must cause rejections"
    for reason in RejectReason:
        assert delta(after, before, P + "examples_rejected_total", reason=reason.value) == on_topic[reason.value], reason
    assert delta(after, before, P + "messages_produced_total", service="curator", topic=topics.rejected) == sum(on_topic.values())

    # LLM calls by outcome: what the simulator answered.
    stats = sim.stats
    calls = {o: delta(after, before, P + "llm_calls_total", endpoint="default", outcome=o) for o in ("ok", "429", "5xx")}
    assert calls["ok"] == stats.status(200) > 0
    assert calls["429"] == stats.status(429) > 0
    assert calls["5xx"] == stats.status(500) + stats.status(503) > 0
    assert delta(after, before, P + "llm_calls_total", endpoint="default") == stats.requests
    assert delta(after, before, P + "llm_latency_seconds_count", endpoint="default") == stats.status(200)
    assert delta(after, before, P + "ratelimit_wait_seconds_count", endpoint="default") == stats.requests

    # Tokens and cost: the simulator's usage, priced.
    prompt = delta(after, before, P + "llm_tokens_total", endpoint="default", kind="prompt")
    completion = delta(after, before, P + "llm_tokens_total", endpoint="default", kind="completion")
    assert (prompt, completion) == (stats.prompt_tokens, stats.completion_tokens)
    expected_cost = (stats.prompt_tokens * INPUT_PRICE + stats.completion_tokens * OUTPUT_PRICE) / 1e6
    assert delta(after, before, P + "llm_cost_usd_total", endpoint="default") == pytest.approx(expected_cost, rel=1e-9)
    assert final.cost_usd == pytest.approx(expected_cost, rel=1e-6)

    # The bus: every task the planner produced, the generator consumed; every candidate reached the curator.
    planned = delta(after, before, P + "messages_produced_total", service="planner", topic=topics.tasks)
    assert planned == delta(after, before, P + "messages_consumed_total", service="generator", topic=topics.tasks) > 0
    assert delta(after, before, P + "messages_produced_total", service="generator", topic=topics.candidates) == planned
    assert delta(after, before, P + "messages_consumed_total", service="curator", topic=topics.candidates) == planned
    assert delta(after, before, P + "requests_finished_total", state="COMPLETED") == 1

    # Gauges once quiet: nothing in flight, no lag. The COMPLETED request's dedup state is one of the
    # few the curator keeps (REOPENED_KEPT) to re-curate its late candidates; nothing else stays.
    assert after.total(P + "in_flight_messages") == 0
    assert after.total(P + "llm_in_flight_calls", endpoint="default") == 0
    lags = list(after.select(P + "consumer_lag_messages", topic=topics.candidates))
    assert lags and all(s.value == 0 for s in lags)
    assert after.total(P + "dedup_requests") <= 1
    assert after.total(P + "dedup_state_entries") <= after.total(P + "examples_accepted_total")
    assert after.total(P + "requests", state="COMPLETED") >= 1
    assert 0 <= after.maximum(P + "ratelimit_usage_ratio", endpoint="default") <= 1

    checked = promtool_check(text)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked.stdout + checked.stderr


@pytest.mark.slow
async def test_metrics_text_passes_promtool_and_parses(bus_settings, simulator):
    """Even before any request: the endpoint serves lint-clean text that `top` can read."""
    settings = bus_settings.with_updates(endpoints_json=endpoint_json(LLMTarget(simulator.base_url, "datacreator-simulator")))
    group = await ServiceGroup(settings).start()
    try:
        url = f"{group.health.url}/metrics"
        text = await fetch(url)
        wanted = {settings.topics.requests, settings.topics.tasks, settings.topics.candidates}
        deadline = time.monotonic() + 10
        while True:  # a partition's lag is known from its first fetch answer
            snap = await scrape([url])
            if {s.labels.get("topic") for s in snap.select(P + "consumer_lag_messages")} >= wanted or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        await group.stop()
    checked = promtool_check(text)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked.stdout + checked.stderr
    for service in ("planner", "generator", "curator"):
        assert snap.total(P + "service_up", service=service) == 1
    assert any(s.labels.get("instance") == url for s in snap.samples)
    lags = {(s.labels["topic"], s.labels["partition"]): s.value for s in snap.select(P + "consumer_lag_messages")}
    assert {(t, str(p)) for t in wanted for p in range(3)} <= set(lags)
    assert all(v == 0 for (t, _), v in lags.items() if t in wanted)
    after_stop = await scrape_registry()
    assert not [s for s in after_stop.select(P + "consumer_lag_messages") if s.labels["topic"] in wanted], \
        "a stopped consumer reports no lag for partitions it no longer reads"


def test_promtool_rejects_bad_metric_text():
    """The check is real: a counter without `_total` and a malformed line fail."""
    bad = "# HELP x_bytes counter\n# TYPE x_bytes counter\nx_bytes 1\n"
    linted = promtool_check(bad)
    assert linted.returncode != 0 and "_total" in linted.stderr
    assert promtool_check("not a metric line {\n").returncode != 0

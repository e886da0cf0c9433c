"""datacreator benchmarks, in one run, as ratios measured side by side on the same machine.

Starts what it needs: the embedded broker and every service in this process (EmbeddedStack),
the LLM simulator in a child process of its own, the peers in child processes; Redis must be
running. Prints one table and writes results.json and benchmarks.png:

1. quota    share of the RPM/TPM limit used and share of 429s, 1/2/4 generator replicas sharing Redis
2. overhead per-call latency the bus adds (zero-latency simulator), examples/s, CPU per example
3. batching prompt tokens per accepted example at examples_per_call = 1, 5, 10
4. peers    datacreator vs a cookbook-style asyncio client and Bespoke Curator: at the rate limit
            (datacreator with the most generator replicas of the quota section) and with no
            limit, same simulator, limits, examples, concurrency
5. scaling  wall time and memory for 1k, 10k (and 100k with --full) examples
6. bus      what batching saves on the embedded broker: single-record batches against its profile (one-off)

    python -m benchmarks run            # ~5-10 minutes
    python -m benchmarks run --quick    # ~2 minutes
    python -m benchmarks run --full     # adds 100k examples to the scaling section
    python -m benchmarks run --window 60 --replicas 1 4   # a 60 s rate-limit window, 1 and 4 replicas
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiokafka.partitioner import murmur2

from benchmarks import common, peers
from benchmarks.results import write_results
from datacreator import remote
from datacreator.bus.codec import encode, encode_key
from datacreator.bus.factory import make_producer
from datacreator.bus.readback import read_to_end
from datacreator.config import Settings
from datacreator.contracts import Candidate, CreationRequest, Example, GenerationTask, ModelSpec, RequestStatus, TaskOutcome
from datacreator.embedded.broker import EmbeddedBroker
from datacreator.ratelimit import max_in_window
from datacreator.serve import CORE_SERVICES
from datacreator.stack import EmbeddedStack

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("quota", "overhead", "batching", "peers", "scaling", "bus")
PARTITIONS = 4


@dataclass
class Plan:
    """Sizes of one run (default, --quick, --full)."""

    window_s: float = 5.0
    quota_rpm: int = 120  # per window: 24 calls/s
    quota_duration_s: float = 20.0
    replicas: tuple[int, ...] = (1, 2, 4)
    latency_s: float = 0.3
    peer_latency_s: float = 0.5
    concurrency: int = 32
    examples_per_call: int = 5
    peer_limited_n: int = 2000
    # 6,000: at 2,000 the first and the last of 13 rounds of 32 calls were an eighth of the run, and
    # the rate measured was the ramp's as much as the sustained one (for the peers as for datacreator)
    peer_open_n: int = 6000
    overhead_n: int = 2000
    batching_n: int = 300
    scaling: tuple[int, ...] = (1_000, 10_000)
    bus_publishes: int = 300

    @classmethod
    def for_mode(cls, quick: bool, full: bool) -> Plan:
        if quick:
            return cls(window_s=2.0, quota_rpm=48, quota_duration_s=8.0, replicas=(1, 2), peer_limited_n=1000,
                       peer_open_n=1000, overhead_n=1000, batching_n=100, scaling=(1_000,), bus_publishes=100)
        plan = cls()
        if full:
            plan.scaling = (1_000, 10_000, 100_000)
        return plan

    def with_window(self, window_s: float) -> Plan:
        """The same plan on a rate-limit window of `window_s`: the limit scales with the window, so
        that the calls allowed per second stay the same; each quota run lasts a whole number of
        windows, at least 2 (a share of the limit over part of a window says little); the
        at-limit run of the peers section spans at least as many windows as before, or it
        would end inside the first window and never meet the limit."""
        if window_s <= 0:
            raise ValueError(f"the window must be positive, not {window_s:g} s")
        scale = window_s / self.window_s
        windows = max(2, math.ceil(self.quota_duration_s / window_s - 1e-9))
        return replace(self, window_s=window_s, quota_rpm=max(1, round(self.quota_rpm * scale)),
                       quota_duration_s=windows * window_s,
                       peer_limited_n=max(self.peer_limited_n, round(self.peer_limited_n * scale)))

    def details(self) -> dict[str, Any]:
        """What results.json records of the plan: the window and replica counts a run used."""
        return {"window_s": self.window_s, "quota_rpm": self.quota_rpm, "quota_duration_s": self.quota_duration_s,
                "replicas": list(self.replicas), "peer_limited_n": self.peer_limited_n}


@dataclass
class Row:
    section: str
    measure: str
    value: str
    goal: str = ""
    ok: bool | None = None


@dataclass
class Bench:
    plan: Plan
    redis_url: str
    sim: common.SimulatorProcess
    rows: list[Row] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    def row(self, section: str, measure: str, value: str, goal: str = "", ok: bool | None = None) -> None:
        self.rows.append(Row(section, measure, value, goal, ok))
        mark = "" if ok is None else ("  [goal met]" if ok else "  [goal NOT met]")
        print(f"  {section:<9} {measure:<58} {value}{mark}", file=sys.stderr, flush=True)

    def settings(self, endpoints: dict[str, dict[str, Any]], **changes: Any) -> Settings:
        return Settings(
            endpoints_json=json.dumps(endpoints), redis_url=self.redis_url, topic_partitions=PARTITIONS,
            ratelimit_window_s=self.plan.window_s, kafka_session_timeout_ms=6000, shutdown_timeout_s=3.0,
            max_in_flight=256, **changes,
        )

    def endpoint(self, rpm: int | None = None, tpm: int | None = None, concurrency: int = 256) -> dict[str, Any]:
        return {"base_url": self.sim.base_url, "model": "datacreator-simulator", "rpm": rpm, "tpm": tpm,
                "max_concurrency": concurrency, "max_attempts": 8}


def request(target: int, endpoint: str, chains: int, per_call: int, request_id: str | None = None) -> CreationRequest:
    return CreationRequest(
        request_id=request_id or f"bench-{uuid.uuid4().hex[:12]}", instruction=common.INSTRUCTION,
        formatting_example=common.SEED_EXAMPLE, target_count=target, examples_per_call=per_call, chains=chains,
        model=ModelSpec(endpoint=endpoint, max_tokens=common.MAX_TOKENS),
    )


async def run_to_end(settings: Settings, req: CreationRequest, timeout_s: float = 3600) -> tuple[RequestStatus, float]:
    """Submit and wait; the wall time runs from submission to the planner's finished_at."""
    submitted = time.time()
    await remote.submit(settings, req)
    final = await remote.wait_for_final(settings, req.request_id, timeout_s=timeout_s)
    return final, (final.finished_at or time.time()) - submitted


async def run_all_to_end(settings: Settings, reqs: list[CreationRequest], timeout_s: float = 3600) -> tuple[list[RequestStatus], float]:
    """Submit every request, then wait for each; the wall time runs from the first submission to
    the last finished_at. Waited for one after the other: one status reader polls the broker, not
    one per request, and a request that ended meanwhile is found on the status topic."""
    submitted = time.time()
    for req in reqs:
        await remote.submit(settings, req)
    finals = [await remote.wait_for_final(settings, req.request_id, timeout_s=timeout_s) for req in reqs]
    return finals, max(final.finished_at or time.time() for final in finals) - submitted


async def start_stack(stack: EmbeddedStack) -> Settings:
    started = time.monotonic()
    try:
        live = await asyncio.wait_for(stack.start(), 120)
    except BaseException:
        await stop_stack(stack)
        raise
    print(f"  (stack of {len(stack.services)} services ready in {time.monotonic() - started:.1f} s)", file=sys.stderr)
    return live


async def stop_stack(stack: EmbeddedStack) -> None:
    """Stop the services, bounded: a stop that hangs must not hang the benchmark; the broker goes anyway."""
    try:
        await asyncio.wait_for(stack.stop(), 60)
    except TimeoutError:
        print("  (services did not stop within 60 s; stopping the broker)", file=sys.stderr)
        await stack.broker.stop()


def ids_per_partition(count: int) -> list[str]:
    """Request ids whose tasks land on partitions 0..count-1 (aiokafka's default partitioner), so
    that every generator replica of a consumer group gets its share of the work."""
    found: dict[int, str] = {}
    while len(found) < count:
        rid = f"bench-q-{uuid.uuid4().hex[:10]}"
        partition = (murmur2(rid.encode()) & 0x7FFFFFFF) % PARTITIONS
        if partition < count:
            found.setdefault(partition, rid)
    return [found[p] for p in range(count)]


# ---------------------------------------------------------------------------------------------
# 1. Quota use through the pipeline


async def first_admission(sim: common.SimulatorProcess, timeout_s: float = 120.0) -> None:
    """Wait until the simulator has admitted a call. A run's share of the limit is counted from its
    first admission, so its clock starts there: on a loaded machine the first call may leave
    seconds after the submission, and a run timed from then would stop before its last window."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (await asyncio.to_thread(sim.stats))["admitted"]:
        await asyncio.sleep(0.2)


async def quota(bench: Bench) -> None:
    plan = bench.plan
    per_call = common.call_tokens(plan.examples_per_call)
    rpm, window = plan.quota_rpm, plan.window_s
    tpm = int(rpm * per_call * 1.1)  # requests bind; tokens keep 10% headroom
    duration = plan.quota_duration_s
    print(f"quota: {rpm} requests and {tpm} tokens per {window:g} s window, {duration:g} s per run, "
          f"simulated latency {plan.latency_s:g} s", file=sys.stderr)
    out = []
    for replicas in plan.replicas:
        alias = common.unique_alias("quota")
        bench.aliases.append(alias)
        bench.sim.configure(rpm=rpm, tpm=tpm, rate_window_s=window, latency="normal", latency_s=plan.latency_s,
                            latency_sd_s=plan.latency_s / 4)
        bench.sim.reset()
        settings = bench.settings({alias: bench.endpoint(rpm, tpm, concurrency=128)}, generator_replicas=replicas)
        stack = EmbeddedStack(settings, services=("planner", "curator") + ("generator",) * replicas)
        live = await start_stack(stack)
        try:
            ids = ids_per_partition(PARTITIONS)
            submitted = time.monotonic()
            for rid in ids:
                # more chains than the limit needs, so that the limiter, not the chains' turn-around, binds
                await remote.submit(live, request(1_000_000, alias, chains=32, per_call=plan.examples_per_call, request_id=rid))
            await first_admission(bench.sim)
            first_call_s = time.monotonic() - submitted
            await asyncio.sleep(duration + 2 * plan.latency_s + 1)
            for rid in ids:
                await remote.cancel(live, rid, "benchmark run over")
        finally:
            await stop_stack(stack)
        stats = await asyncio.to_thread(bench.sim.stats)
        admitted_at, costs = stats["admitted_at"], stats["admitted_tokens"]
        start = min(admitted_at) if admitted_at else 0.0
        in_run = [(t, c) for t, c in zip(admitted_at, costs) if t < start + duration]
        periods = duration / window
        counts = common.call_counts(stats)
        request_share = len(in_run) / (rpm * periods)
        token_share = sum(c for _, c in in_run) / (tpm * periods)
        share_429 = counts["429"] / counts["calls"] if counts["calls"] else 0.0
        peak = max_in_window(admitted_at, window)
        result = {"replicas": replicas, "request_share": request_share, "token_share": token_share, "share_429": share_429,
                  "calls": counts["calls"], "429": counts["429"], "max_in_window": peak, "rpm": rpm, "tpm": tpm,
                  "first_call_s": first_call_s}
        out.append(result)
        used = max(request_share, token_share)
        bench.row("quota", f"{replicas} generator replica(s): limit used ({'requests' if request_share >= token_share else 'tokens'})",
                  f"{used:.1%}", ">= 97%", used >= 0.97)
        bench.row("quota", f"{replicas} generator replica(s): 429 share ({counts['429']}/{counts['calls']}), peak {peak}/{rpm}",
                  f"{share_429:.2%}", "<= 0.5%", share_429 <= 0.005 and peak <= rpm)
    bench.results["quota"] = {"window_s": window, "duration_s": duration, "replicas": list(plan.replicas), "runs": out}


# ---------------------------------------------------------------------------------------------
# 2. Bus overhead


async def _load(settings: Settings, topic: str, model: type, request_id: str) -> list[tuple[Any, float]]:
    """The messages of one request on a topic, each with its record's time (s): when its producer sent it."""
    items = []
    async for record in read_to_end(settings, topic):
        if request_id.encode() != record.key:
            continue
        items.append((model.model_validate_json(record.value), record.timestamp / 1000))
    return items


@dataclass
class CallTimes:
    """Per LLM call of one request, in seconds, from the records' `created_at` on its topics."""

    added: list[float] = field(default_factory=list)  # task -> its first example, minus the LLM's own time
    llm: list[float] = field(default_factory=list)  # the LLM latency the generator measured
    # `added` in three parts that sum to it: the planner sending the task, the task reaching the
    # generator's call, and the candidate reaching the examples topic (its hop and the curator)
    planner: list[float] = field(default_factory=list)  # task made -> its record sent
    generator: list[float] = field(default_factory=list)  # task's record sent -> the call begins
    curator: list[float] = field(default_factory=list)  # candidate -> its first example
    loop: list[float] = field(default_factory=list)  # outcome -> the chain's next task (the planner)


async def call_times(settings: Settings, request_id: str) -> CallTimes:
    """What the bus and the services add to each call of a finished request, read back from its topics."""
    tasks = {t.task_id: (t, sent) for t, sent in await _load(settings, settings.topics.tasks, GenerationTask, request_id)}
    candidates = {c.task.task_id: c for c, _ in await _load(settings, settings.topics.candidates, Candidate, request_id)}
    first_example: dict[str, float] = {}
    for example, _ in await _load(settings, settings.topics.examples, Example, request_id):
        first_example[example.task_id] = min(example.created_at, first_example.get(example.task_id, math.inf))
    outcomes = {o.task_id: o for o, _ in await _load(settings, settings.topics.outcomes, TaskOutcome, request_id)}
    times = CallTimes()
    successor = {(t.chain, t.step): t for t, _ in tasks.values()}
    for task_id, (task, sent) in tasks.items():
        cand = candidates.get(task_id)
        if cand is None or task_id not in first_example:
            continue
        times.llm.append(cand.latency_s)
        times.added.append(first_example[task_id] - task.created_at - cand.latency_s)
        times.planner.append(sent - task.created_at)
        times.generator.append(cand.created_at - cand.latency_s - sent)
        times.curator.append(first_example[task_id] - cand.created_at)
        nxt = successor.get((task.chain, task.step + 1))
        if nxt is not None and task_id in outcomes:
            times.loop.append(nxt.created_at - outcomes[task_id].created_at)
    return times


def p50_p99_ms(values: list[float]) -> dict[str, float]:
    return {"p50": 1000 * common.percentile(values, 50), "p99": 1000 * common.percentile(values, 99)}


async def overhead(bench: Bench, settings: Settings, stack: EmbeddedStack, alias: str) -> None:
    plan = bench.plan
    bench.sim.configure(rpm=None, tpm=None, latency="fixed", latency_s=0.0)
    bench.sim.reset()
    req = request(plan.overhead_n, alias, chains=plan.concurrency, per_call=plan.examples_per_call)
    pids = {"services": os.getpid(), "broker": stack.broker.pid, "simulator": bench.sim.pid}
    before = {name: common.cpu_seconds(pid) for name, pid in pids.items()}
    final, wall = await run_to_end(settings, req)
    cpu = {name: common.cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    times = await call_times(settings, req.request_id)
    added, llm, loop = times.added, times.llm, times.loop
    rate = final.accepted / wall
    result = {
        "examples": final.accepted, "calls": final.llm_calls, "wall_s": wall, "examples_per_s": rate,
        "added_ms": p50_p99_ms(added), "llm_ms": p50_p99_ms(llm), "loop_ms": p50_p99_ms(loop),
        "cpu_ms_per_example": {name: 1000 * seconds / max(1, final.accepted) for name, seconds in cpu.items()},
        "added_samples_ms": [1000 * a for a in added], "concurrency": plan.concurrency,
    }
    bench.results["overhead"] = result
    bench.row("overhead", "added latency per call, task -> examples topic, minus LLM (p50/p99)",
              f"{result['added_ms']['p50']:.1f} / {result['added_ms']['p99']:.1f} ms")
    bench.row("overhead", "planner turn-around, outcome -> next task of the chain (p50/p99)",
              f"{result['loop_ms']['p50']:.1f} / {result['loop_ms']['p99']:.1f} ms")
    bench.row("overhead", f"examples/s sustained, zero-latency LLM, {plan.concurrency} chains, {common.machine()['nproc']} cores",
              f"{rate:,.0f}")
    bench.row("overhead", "CPU per 1000 examples: services / broker / simulator",
              " / ".join(f"{result['cpu_ms_per_example'][n]:.2f} s" for n in ("services", "broker", "simulator")))


# ---------------------------------------------------------------------------------------------
# 3. Batching


async def batching(bench: Bench, settings: Settings, alias: str) -> None:
    bench.sim.configure(rpm=None, tpm=None, latency="fixed", latency_s=0.0)
    out = []
    for per_call in (1, 5, 10):
        final, wall = await run_to_end(settings, request(bench.plan.batching_n, alias, chains=8, per_call=per_call))
        out.append({"examples_per_call": per_call, "prompt_tokens": final.prompt_tokens, "accepted": final.accepted,
                    "calls": final.llm_calls, "prompt_tokens_per_example": final.prompt_tokens / max(1, final.accepted)})
    bench.results["batching"] = out
    for entry in out:
        bench.row("batching", f"prompt tokens per accepted example, examples_per_call={entry['examples_per_call']}",
                  f"{entry['prompt_tokens_per_example']:.0f}")
    ratio = out[0]["prompt_tokens_per_example"] / out[1]["prompt_tokens_per_example"]
    bench.row("batching", "fewer prompt tokens per example at 5 than at 1", f"{ratio:.2f}x", ">= 3x", ratio >= 3)


# ---------------------------------------------------------------------------------------------
# 4. Side by side with the peers


@dataclass
class Ours:
    """datacreator's run in one regime of the peers section."""

    examples: int
    wall_s: float
    replicas: int
    slots: int  # concurrent calls per generator replica
    requests: int
    chains: int
    times: CallTimes | None = None  # per call, read back from the topics (the open run: its stack is still up)


async def ours_open(bench: Bench, settings: Settings, alias: str, n: int) -> Ours:
    """One request on the shared stack (one generator), with the peers' call slots."""
    conc = bench.plan.concurrency
    req = request(n, alias, chains=2 * conc, per_call=bench.plan.examples_per_call)
    final, wall = await run_to_end(settings, req)
    return Ours(final.accepted, wall, 1, conc, 1, 2 * conc, await call_times(settings, req.request_id))


async def ours_at_limit(bench: Bench, n: int, replicas: int) -> Ours:
    """A stack of its own with `replicas` generator services sharing the Redis limit. The peers'
    call slots are split between the replicas; with more than one replica the work is one request
    per tasks partition (a request's tasks share a partition, so one request would keep a single
    replica busy), with the chains split between them."""
    plan = bench.plan
    conc, per_call = plan.concurrency, plan.examples_per_call
    slots = max(1, conc // replicas)
    alias = common.unique_alias("limited")
    bench.aliases.append(alias)
    settings = bench.settings({alias: bench.endpoint(plan.quota_rpm, None, concurrency=slots)}, generator_replicas=replicas)
    stack = EmbeddedStack(settings, services=("planner", "curator") + ("generator",) * replicas)
    live = await start_stack(stack)
    try:
        ids: list[str | None] = [None] if replicas == 1 else list(ids_per_partition(PARTITIONS))
        shares = [n // len(ids) + (1 if i < n % len(ids) else 0) for i in range(len(ids))]
        chains = max(1, 2 * conc // len(ids))
        reqs = [request(share, alias, chains=chains, per_call=per_call, request_id=rid) for rid, share in zip(ids, shares)]
        finals, wall = await run_all_to_end(live, reqs)
    finally:
        await stop_stack(stack)
    return Ours(sum(final.accepted for final in finals), wall, replicas, slots, len(reqs), chains * len(reqs))


def _describe(ours: Ours) -> str:
    if ours.replicas == 1:
        return f"1 generator replica, {ours.slots} concurrent calls ({ours.chains} chains)"
    return (f"{ours.replicas} generator replicas x {ours.slots} concurrent calls "
            f"({ours.requests} requests, {ours.chains} chains)")


async def side_by_side(bench: Bench, settings: Settings, open_alias: str, curator_reason: str | None) -> None:
    """Concurrency is concurrent LLM calls: the endpoint's max_concurrency for datacreator (split
    between its generator replicas), a semaphore for the peers. datacreator runs twice as many
    self-reference chains as call slots, so that a chain whose answer is still on the bus does not
    leave a slot idle. At the rate limit datacreator runs the largest replica count of the plan."""
    plan = bench.plan
    rpm, window, per_call, conc = plan.quota_rpm, plan.window_s, plan.examples_per_call, plan.concurrency
    messages = common.peer_messages(per_call)
    call_tokens = common.call_tokens(per_call)
    regimes = [
        ("at the rate limit", rpm, plan.peer_limited_n, 1.0, max(plan.replicas)),
        ("no limit (overhead-bound)", None, plan.peer_open_n, 1.08, 1),
    ]
    out = []
    for regime, limit, n, goal, replicas in regimes:
        bench.sim.configure(rpm=limit, tpm=None, rate_window_s=window, latency="normal", latency_s=plan.peer_latency_s,
                            latency_sd_s=plan.peer_latency_s / 5)
        runs: dict[str, dict[str, Any]] = {}
        bench.sim.reset()
        ours = await (ours_at_limit(bench, n, replicas) if limit else ours_open(bench, settings, open_alias, n))
        runs["datacreator"] = {"examples": ours.examples, "wall_s": ours.wall_s, "replicas": ours.replicas,
                               "slots_per_replica": ours.slots, "requests": ours.requests, "chains": ours.chains,
                               **common.call_counts(bench.sim.stats())}
        bench.sim.reset()
        config = {"base_url": bench.sim.base_url, "messages": messages, "target": n, "examples_per_call": per_call,
                  "concurrency": conc, "max_tokens": common.MAX_TOKENS, "call_tokens": call_tokens, "rpm": limit,
                  "tpm": None, "window_s": window, "model": "datacreator-simulator"}
        result = await asyncio.to_thread(peers.run_peer, "baseline", config)
        runs["asyncio+httpx (cookbook)"] = {**result, **common.call_counts(bench.sim.stats())}
        if curator_reason is None:
            bench.sim.reset()
            config = {"base_url": bench.sim.base_url, "messages": messages, "calls": math.ceil(n / per_call),
                      "concurrency": conc, "max_tokens": common.MAX_TOKENS,
                      "rpm_per_minute": int(limit * 60 / window) if limit else 10_000_000, "tpm_per_minute": 10**10,
                      "pause_s": max(1, round(10 * window / 60))}
            try:
                result = await asyncio.to_thread(peers.run_peer, "curator", config)
                runs["Bespoke Curator"] = {**result, **common.call_counts(bench.sim.stats())}
            except (RuntimeError, OSError) as exc:
                bench.row("peers", "Bespoke Curator", f"not run: {exc}"[:160])
        for run in runs.values():
            run["examples_per_s"] = run["examples"] / run["wall_s"] if run["wall_s"] else 0.0
        dc = runs["datacreator"]
        for name, run in runs.items():
            if name == "datacreator":
                bench.row("peers", f"{regime}: datacreator, {n} examples, {_describe(ours)}",
                          f"{dc['wall_s']:.1f} s, {dc['examples_per_s']:.0f} ex/s, 429s {dc['429']}, retries {dc['retries']}")
                continue
            bench.row("peers", f"{regime}: {name} / datacreator",
                      f"wall {run['wall_s'] / dc['wall_s']:.2f}x, ex/s {run['examples_per_s'] / dc['examples_per_s']:.2f}x, "
                      f"429s {_ratio(run['429'], dc['429'])}, retries {_ratio(run['retries'], dc['retries'])} "
                      f"({run['examples']} ex, {run['429']} 429s)")
        best = max(r["examples_per_s"] for name, r in runs.items() if name != "datacreator")
        ratio = dc["examples_per_s"] / best
        bench.row("peers", f"{regime}: datacreator ex/s / best peer's ({ours.replicas} generator replica(s))",
                  f"{ratio:.2f}x", f">= {goal}x", ratio >= goal)
        entry: dict[str, Any] = {"regime": regime, "rpm": limit, "window_s": window, "n": n, "concurrency": conc,
                                 "replicas": ours.replicas, "latency_s": plan.peer_latency_s, "runs": runs, "ratio_to_best_peer": ratio}
        if ours.times is not None:
            entry.update(_overhead_bound(bench, ours.times, dc["examples_per_s"], best))
        out.append(entry)
    bench.results["peers"] = {"regimes": out, "curator": curator_reason or "run"}


def _overhead_bound(bench: Bench, times: CallTimes, ours: float, best_peer: float) -> dict[str, Any]:
    """The overhead-bound regime against its concurrency bound (calls in flight x examples per call
    / mean latency), and what the bus added to each of datacreator's calls there, by part."""
    plan = bench.plan
    bound = common.concurrency_bound(plan.concurrency, plan.examples_per_call, plan.peer_latency_s)
    share, peer_share = ours / bound, best_peer / bound
    parts = {"planner": p50_p99_ms(times.planner), "generator": p50_p99_ms(times.generator), "curator": p50_p99_ms(times.curator)}
    added = p50_p99_ms(times.added)
    bench.row("peers", f"no limit: share of the concurrency bound ({bound:.0f} ex/s): datacreator / best peer",
              f"{share:.1%} / {peer_share:.1%}", ">= 95%", share >= 0.95)
    bench.row("peers", "no limit: added latency per call, datacreator (p50 / p99)",
              f"{added['p50']:.1f} / {added['p99']:.1f} ms", "< 15 / 50 ms", added["p50"] < 15 and added["p99"] < 50)
    bench.row("peers", "  of it p50 (p99): planner sends / tasks topic -> call / candidate -> example",
              " / ".join(f"{parts[k]['p50']:.1f} ({parts[k]['p99']:.0f})" for k in parts) + " ms")
    return {"bound_examples_per_s": bound, "share_of_bound": share, "best_peer_share_of_bound": peer_share,
            "added_ms": added, "added_parts_ms": parts}


def _ratio(peer: float, ours: float) -> str:
    if ours == 0:
        return "-" if peer == 0 else f"{peer:g} vs 0"
    return f"{peer / ours:.2f}x"


# ---------------------------------------------------------------------------------------------
# 5. Scaling with work


async def scaling(bench: Bench, settings: Settings, stack: EmbeddedStack, alias: str) -> None:
    bench.sim.configure(rpm=None, tpm=None, latency="fixed", latency_s=0.0)
    out = []
    for n in bench.plan.scaling:
        rss_before = common.rss_mib()
        final, wall = await run_to_end(settings, request(n, alias, chains=64, per_call=bench.plan.examples_per_call))
        assert stack.group is not None
        curator = next(r.handler for r in stack.group.runners if r.handler.name == "curator")
        entry = {"n": n, "accepted": final.accepted, "wall_s": wall, "examples_per_s": final.accepted / wall,
                 "rss_mib": common.rss_mib(), "rss_growth_mib": common.rss_mib() - rss_before,
                 "broker_rss_mib": common.rss_mib(stack.broker.pid),
                 "dedup_entries": curator.state.state_size()}
        out.append(entry)
        bench.row("scaling", f"{n:,} examples: wall, examples/s",
                  f"{wall:.1f} s, {entry['examples_per_s']:.0f} ex/s ({final.state.value})")
        bench.row("scaling", f"{n:,} examples: RSS of services (growth) / of broker; dedup entries",
                  f"{entry['rss_mib']:.0f} MiB (+{entry['rss_growth_mib']:.0f}) / {entry['broker_rss_mib']:.0f} MiB; "
                  f"{entry['dedup_entries']:,}")
    bench.results["scaling"] = out


# ---------------------------------------------------------------------------------------------
# 6. Single-record batches


async def single_record_cost(bench: Bench, settings: Settings) -> None:
    """What single-record batches (the embedded broker's profile before `bus.ends` read partition
    ends from a fetch) cost against the profile as shipped, which batches: one curator publish
    awaited at a time (5 examples on one partition and an outcome), and records sent to one
    partition as fast as the producer takes them. The producer has one request in flight per
    broker and one batch per partition in it, so single-record batches carry one record per
    partition per round trip."""
    sample = Example(example_id="x" * 64, request_id="bench-bus", data=common.SEED_EXAMPLE, strategy="random",
                     reference_ids=[None], task_id="t" * 32, chain=0, step=0, model="datacreator-simulator")
    value, key = encode(sample), encode_key("bench-bus")
    topics = settings.topics
    out = {}
    for label, single in (("single-record batches", True), ("ordinary batching", False)):
        profile = common.single_record_profile() if single else EmbeddedBroker.client_overrides()
        producer = make_producer(settings.with_updates(kafka_client_overrides=profile))
        await producer.start()
        try:
            started = time.perf_counter()
            for _ in range(bench.plan.bus_publishes):
                futures = [await producer.send(topics.examples, value, key=key) for _ in range(5)]
                futures.append(await producer.send(topics.outcomes, value, key=key))
                await asyncio.gather(*futures)
            serial = time.perf_counter() - started
            records = 10 * bench.plan.bus_publishes
            started = time.perf_counter()
            await asyncio.gather(*[await producer.send(topics.examples, value, key=key) for _ in range(records)])
            stream = time.perf_counter() - started
        finally:
            await producer.stop()
        out[label] = {"ms_per_publish": 1000 * serial / bench.plan.bus_publishes, "records_per_s_one_partition": records / stream}
    slow, fast = out["single-record batches"], out["ordinary batching"]
    bench.results["bus"] = out
    bench.row("bus", "one curator publish (5 examples + outcome): single-record / batched",
              f"{slow['ms_per_publish']:.2f} / {fast['ms_per_publish']:.2f} ms = {slow['ms_per_publish'] / fast['ms_per_publish']:.2f}x")
    bench.row("bus", "records/s into one partition: single-record / batched",
              f"{slow['records_per_s_one_partition']:,.0f} / {fast['records_per_s_one_partition']:,.0f} = "
              f"{fast['records_per_s_one_partition'] / slow['records_per_s_one_partition']:.1f}x fewer")


# ---------------------------------------------------------------------------------------------


def print_table(bench: Bench, header: str) -> None:
    print()
    print(header)
    widths = [9, max(len(r.measure) for r in bench.rows), max(len(r.value) for r in bench.rows), 8]
    line = f"{'section':<{widths[0]}}  {'measure':<{widths[1]}}  {'value':<{widths[2]}}  {'goal':<{widths[3]}}  met"
    print(line)
    print("-" * len(line))
    for r in bench.rows:
        met = "" if r.ok is None else ("yes" if r.ok else "NO")
        print(f"{r.section:<{widths[0]}}  {r.measure:<{widths[1]}}  {r.value:<{widths[2]}}  {r.goal:<{widths[3]}}  {met}")


def plot(bench: Bench, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    res = bench.results
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ax = axes[0][0]
    if "quota" in res:
        runs = res["quota"]["runs"]
        labels = [str(r["replicas"]) for r in runs]
        ax.bar(labels, [100 * max(r["request_share"], r["token_share"]) for r in runs], color="#4c72b0")
        ax.axhline(97, color="red", ls="--", lw=1, label="goal 97%")
        for i, r in enumerate(runs):
            ax.text(i, 5, f"429s {100 * r['share_429']:.2f}%", ha="center", color="white", fontsize=8)
        ax.set_ylim(0, 115)
        ax.legend(loc="upper right", fontsize=8)
    ax.set(title="Quota used (limit share, %)", xlabel="generator replicas")
    ax = axes[0][1]
    if "peers" in res:
        regimes = res["peers"]["regimes"]
        names = list(regimes[0]["runs"])
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            values = [reg["runs"].get(name, {}).get("examples_per_s", 0) for reg in regimes]
            ax.bar([i + j * width for i in range(len(regimes))], values, width, label=name)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(regimes))], [r["regime"] for r in regimes])
        ax.legend(fontsize=8)
    ax.set(title="Side by side: examples/s", ylabel="examples/s")
    ax = axes[0][2]
    if "overhead" in res:
        samples = res["overhead"]["added_samples_ms"]
        ax.hist(samples, bins=50, color="#55a868")
        ax.axvline(res["overhead"]["added_ms"]["p50"], color="k", ls="--", lw=1, label="p50")
        ax.axvline(res["overhead"]["added_ms"]["p99"], color="red", ls="--", lw=1, label="p99")
        ax.legend()
    ax.set(title="Bus latency added per call (ms)", xlabel="ms", ylabel="calls")
    ax = axes[1][0]
    if "batching" in res:
        entries = res["batching"]
        ax.bar([str(e["examples_per_call"]) for e in entries], [e["prompt_tokens_per_example"] for e in entries], color="#c44e52")
    ax.set(title="Prompt tokens per accepted example", xlabel="examples_per_call")
    ax = axes[1][1]
    if "scaling" in res:
        entries = res["scaling"]
        xs = [e["n"] for e in entries]
        ax.plot(xs, [e["wall_s"] for e in entries], "o-", label="wall (s)")
        ax.plot(xs, [e["rss_mib"] for e in entries], "s-", label="services RSS (MiB)")
        ax.plot(xs, [e["broker_rss_mib"] for e in entries], "^-", label="broker RSS (MiB)")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set(title="Scaling with work", xlabel="examples")
    ax = axes[1][2]
    if "bus" in res:
        labels = list(res["bus"])
        ax.bar(labels, [res["bus"][k]["records_per_s_one_partition"] for k in labels], color="#8172b2")
        ax.set_yscale("log")
    ax.set(title="Produce into one partition (records/s)")
    m = common.machine()
    fig.suptitle(f"datacreator benchmarks - {m['nproc']} cores ({m['cpu']}), shared")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


async def run(args: argparse.Namespace) -> int:
    plan = Plan.for_mode(args.quick, args.full)
    if args.window is not None:
        plan = plan.with_window(args.window)
    if args.replicas:
        plan = replace(plan, replicas=tuple(args.replicas))
    sections = [s for s in SECTIONS if s in (args.only or SECTIONS)]
    started = time.monotonic()
    info = common.machine()
    print(f"machine: {info['nproc']} cores, {info['cpu']}, load {info['load_1m']}; sections: {', '.join(sections)}", file=sys.stderr)
    sim = common.SimulatorProcess()
    bench = Bench(plan, args.redis_url, sim)
    try:
        if "quota" in sections:
            await quota(bench)
        rest = [s for s in sections if s != "quota"]
        if rest:
            curator_reason = None
            if "peers" in rest:
                curator_reason = None if args.no_curator is False else "--no-curator"
                if curator_reason is None:
                    curator_reason = await asyncio.to_thread(peers.curator_available)
                if curator_reason:
                    bench.row("peers", "Bespoke Curator", f"not run: {curator_reason}"[:160])
            capped, opened = common.unique_alias("capped"), common.unique_alias("open")
            bench.aliases += [capped, opened]
            settings = bench.settings({
                capped: bench.endpoint(None, None, concurrency=plan.concurrency),  # peers, no limit
                opened: bench.endpoint(None, None),
            })  # peers at the limit: a stack of their own (ours_at_limit)
            stack = EmbeddedStack(settings, services=CORE_SERVICES)
            live = await start_stack(stack)
            try:
                if "overhead" in rest:
                    await overhead(bench, live, stack, opened)
                if "batching" in rest:
                    await batching(bench, live, opened)
                if "peers" in rest:
                    await side_by_side(bench, live, capped, curator_reason)
                if "scaling" in rest:
                    await scaling(bench, live, stack, opened)
                if "bus" in rest:
                    await single_record_cost(bench, live)
            finally:
                await stop_stack(stack)
    finally:
        sim.stop()
        with contextlib.suppress(Exception):
            await common.delete_redis_keys(args.redis_url, [f"*datacreator:ratelimit:{alias}*" for alias in bench.aliases])
    elapsed = time.monotonic() - started
    info = common.machine()
    bench.results["mode"] = "quick" if args.quick else ("full" if args.full else "default")
    bench.results["plan"] = plan.details()
    bench.results["elapsed_s"] = elapsed
    bench.results["rows"] = [r.__dict__ for r in bench.rows]
    header = (f"datacreator benchmarks ({bench.results['mode']}, {elapsed:.0f} s) on {info['nproc']} cores, {info['cpu']}, "
              f"load {info['load_1m']}; rate-limit window {plan.window_s:g} s (simulator and limiter)")
    print_table(bench, header)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(out_dir / "results.json", headline(bench.results), ["run"], bench.results, info)
    problem = plot(bench, out_dir / "benchmarks.png")
    print(f"\nresults: {out_dir / 'results.json'}; plot: {problem or out_dir / 'benchmarks.png'}")
    return 0


def headline(results: dict[str, Any]) -> dict[str, float | None]:
    """The stable results.json keys from the sections that ran (benchmarks/results.py)."""
    values: dict[str, float | None] = {}
    runs = results.get("quota", {}).get("runs", [])
    if runs:
        values["quota_used"] = min(max(r["request_share"], r["token_share"]) for r in runs)
        values["share_429"] = max(r["share_429"] for r in runs)
    if "overhead" in results:
        values["added_latency_p50_ms"] = results["overhead"]["added_ms"]["p50"]
        values["added_latency_p99_ms"] = results["overhead"]["added_ms"]["p99"]
    for regime in results.get("peers", {}).get("regimes", []):
        key = "at_limit_vs_best_peer" if regime["rpm"] else "overhead_bound_vs_best_peer"
        values[key] = regime["ratio_to_best_peer"]
        if "share_of_bound" in regime:
            values["overhead_bound_share_of_bound"] = regime["share_of_bound"]
            values["overhead_bound_added_latency_p50_ms"] = regime["added_ms"]["p50"]
            values["overhead_bound_added_latency_p99_ms"] = regime["added_ms"]["p99"]
    for entry in results.get("scaling", []):
        if entry["n"] == 100_000:
            values["scaling_100k_examples_per_s"] = entry["examples_per_s"]
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller runs, about 2 minutes")
    mode.add_argument("--full", action="store_true", help="adds 100k examples to the scaling section")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--window", type=float, metavar="S",
                        help="rate-limit window of the simulator and the limiter in seconds (default 5, --quick 2); "
                             "the limit scales with it, calls per second stay the same")
    parser.add_argument("--replicas", type=_positive_int, nargs="+", metavar="N",
                        help="generator replica counts of the quota section (default 1 2 4, --quick 1 2); "
                             "the largest also runs datacreator at the rate limit in the peers section")
    parser.add_argument("--no-curator", action="store_true", help="skip Bespoke Curator even when its venv exists")
    parser.add_argument("--redis-url", default=os.environ.get("DATACREATOR_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where results.json and benchmarks.png go")
    parser.add_argument("--verbose", action="store_true", help="log the services' warnings")
    args = parser.parse_args(argv)
    if args.window is not None and args.window <= 0:
        parser.error(f"--window must be positive, not {args.window:g}")
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(until_signalled(run(args)))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a replica count is at least 1, not {value}")
    return value


async def until_signalled(main_coro: Any) -> int:
    """SIGTERM cancels the run, so that the simulator, the broker and the peers are stopped."""
    task = asyncio.ensure_future(main_coro)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        print("benchmark cancelled", file=sys.stderr)
        return 130



def cli() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(cli())

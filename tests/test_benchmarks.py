"""The benchmark harness: the baseline peer against a real simulator, and a short run of `benchmarks/run.py`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner

from benchmarks import common, peers
from benchmarks.run import PARTITIONS, Plan, ids_per_partition

ROOT = Path(__file__).resolve().parent.parent


def _baseline_config(sim, target: int, **changes):
    return {
        "base_url": sim.base_url, "messages": common.peer_messages(5), "target": target, "examples_per_call": 5,
        "concurrency": 4, "max_tokens": common.MAX_TOKENS, "call_tokens": common.call_tokens(5), "rpm": None,
        "tpm": None, "window_s": 1.0, **changes,
    }


async def test_baseline_collects_the_distinct_examples_asked_for(make_simulator):
    sim = make_simulator()
    result = await peers.run_baseline(_baseline_config(sim, target=42))
    assert result["examples"] >= 42
    assert result["ok"] == sim.stats.status(200) >= 9  # 5 examples a call: at least ceil(42 / 5) calls
    assert result["429"] == 0 and result["failed"] == 0


async def test_baseline_paces_to_the_limit_and_retries_429s(make_simulator):
    sim = make_simulator(rpm=10, rate_window_s=1.0)
    result = await peers.run_baseline(_baseline_config(sim, target=100, rpm=10, window_s=1.0))
    assert result["examples"] >= 100
    # the capacity tracker keeps it near the limit; any 429 it met was retried, none lost
    assert result["429"] == sim.stats.status(429)
    assert result["failed"] == 0
    assert sim.stats.max_admitted_in_window(1.0) <= 10
    assert result["wall_s"] >= 1.0  # 20 calls at 10 per second cannot all go in the first window


def test_request_ids_cover_every_partition():
    ids = ids_per_partition(PARTITIONS)
    partitioner = DefaultPartitioner()
    partitions = list(range(PARTITIONS))
    assert [partitioner(rid.encode(), partitions, partitions) for rid in ids] == partitions


@pytest.mark.parametrize("quick", [False, True])
def test_a_longer_window_keeps_the_call_rate_and_spans_whole_windows(quick):
    plan = Plan.for_mode(quick, False)
    assert plan.with_window(plan.window_s) == plan  # the modes' own windows change nothing
    for window in (4.0, 60.0):
        scaled = plan.with_window(window)
        assert scaled.quota_rpm / window == pytest.approx(plan.quota_rpm / plan.window_s, rel=0.01)
        windows = scaled.quota_duration_s / window
        assert windows == int(windows) >= 2 and scaled.quota_duration_s >= min(plan.quota_duration_s, 2 * window)
        assert scaled.peer_limited_n / scaled.quota_rpm >= plan.peer_limited_n / plan.quota_rpm - 1e-9
        assert scaled.replicas == plan.replicas
    assert Plan().with_window(60.0).quota_rpm == 1440 and Plan().with_window(60.0).quota_duration_s == 120


def test_the_pipelining_benchmark_restores_the_curators_flag():
    from benchmarks.pipelining import curator_pipelined
    from datacreator.handlers.curator import CuratorHandler

    shipped = CuratorHandler.pipelined
    with pytest.raises(RuntimeError), curator_pipelined(not shipped):
        assert CuratorHandler.pipelined is (not shipped)
        raise RuntimeError
    assert CuratorHandler.pipelined is shipped


@pytest.mark.slow
def test_quick_run_prints_the_table_and_writes_results(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "batching", "bus", "--no-curator",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "prompt tokens per accepted example" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    per_example = [entry["prompt_tokens_per_example"] for entry in results["batching"]]
    assert [entry["examples_per_call"] for entry in results["batching"]] == [1, 5, 10]
    assert per_example[0] > per_example[1] > per_example[2] > 0
    assert results["bus"]["single-record batches"]["records_per_s_one_partition"] > 0
    assert (tmp_path / "benchmarks.png").stat().st_size > 10_000

"""results.json keeps the same keys whatever ran: a script compares two files key by key."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import models, rate_limit, run
from benchmarks.results import STABLE_KEYS, write_results

KEYS = ["overhead_bound_vs_best_peer", "at_limit_vs_best_peer", "added_latency_p50_ms", "added_latency_p99_ms",
        "quota_used", "share_429", "scaling_100k_examples_per_s", "first_run_s", "embedded_examples_per_min",
        "overhead_bound_share_of_bound", "overhead_bound_added_latency_p50_ms", "overhead_bound_added_latency_p99_ms"]


def test_every_stable_key_is_written_null_when_not_measured(tmp_path):
    path = tmp_path / "out" / "results.json"
    write_results(path, {"share_429": 0.002, "added_latency_p99_ms": math.nan}, ["run"], {"quota": {"runs": []}}, {"nproc": 2})
    data = json.loads(path.read_text())
    assert list(data)[: len(KEYS)] == KEYS == list(STABLE_KEYS)
    assert data["share_429"] == 0.002
    assert data["added_latency_p99_ms"] is None  # not a number is not a measurement
    assert all(data[k] is None for k in KEYS if k != "share_429")
    assert data["benchmarks"] == ["run"] and data["machine"] == {"nproc": 2} and data["quota"] == {"runs": []}


def test_an_unknown_key_or_a_detail_named_like_a_stable_key_is_refused(tmp_path):
    with pytest.raises(KeyError, match="quota_usd"):
        write_results(tmp_path / "r.json", {"quota_usd": 1.0}, ["run"])
    with pytest.raises(KeyError, match="share_429"):
        write_results(tmp_path / "r.json", {}, ["run"], {"share_429": 0.5})
    with pytest.raises(TypeError):
        write_results(tmp_path / "r.json", {"quota_used": "99%"}, ["run"])
    assert not (tmp_path / "r.json").exists()


def test_run_takes_its_headline_from_the_sections_that_ran():
    results = {
        "quota": {"runs": [{"request_share": 0.99, "token_share": 0.5, "share_429": 0.001},
                           {"request_share": 0.97, "token_share": 0.98, "share_429": 0.004}]},
        "overhead": {"added_ms": {"p50": 12.0, "p99": 40.0}},
        "peers": {"regimes": [{"rpm": 120, "ratio_to_best_peer": 1.06},
                              {"rpm": None, "ratio_to_best_peer": 0.85, "share_of_bound": 0.95, "added_ms": {"p50": 20.0, "p99": 200.0}}]},
        "scaling": [{"n": 1_000, "examples_per_s": 300.0}, {"n": 100_000, "examples_per_s": 410.0}],
    }
    assert run.headline(results) == {
        "quota_used": 0.98, "share_429": 0.004, "added_latency_p50_ms": 12.0, "added_latency_p99_ms": 40.0,
        "at_limit_vs_best_peer": 1.06, "overhead_bound_vs_best_peer": 0.85, "scaling_100k_examples_per_s": 410.0,
        "overhead_bound_share_of_bound": 0.95, "overhead_bound_added_latency_p50_ms": 20.0, "overhead_bound_added_latency_p99_ms": 200.0,
    }
    assert run.headline({"batching": [], "scaling": [{"n": 1_000, "examples_per_s": 300.0}]}) == {}


def test_rate_limit_and_models_fill_their_keys():
    rows = [rate_limit.Row("1 replica, Redis", 100, 99, 1, 0.99, 0.5, 60, 1000, 0),
            rate_limit.Row("2 replicas, Redis", 100, 97, 3, 0.97, 0.5, 60, 1000, 0),
            rate_limit.Row("2 replicas, 10 s outage", 100, 50, 20, 0.5, 0.5, 60, 1000, 0)]
    assert rate_limit.headline(rows) == {"quota_used": 0.97, "share_429": 0.03}
    def model_run(model: str, accepted: int, wall_s: float) -> models.Run:
        return models.Run(model=model, request="r", state="COMPLETED", target=10, accepted=accepted, items=accepted,
                          unparseable=0, rejected={}, llm_calls=2, failed_calls=0, completion_tokens=100, wall_s=wall_s)

    first, second, other = model_run("a", 6, 60.0), model_run("a", 4, 60.0), model_run("b", 10, 1.0)
    assert models.examples_per_minute([first, second, other]) == 5.0
    assert models.examples_per_minute([]) is None

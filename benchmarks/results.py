"""results.json: the headline figures under keys that stay the same from commit to commit.

Every key of `STABLE_KEYS` is in every file, null when the benchmarks run in that invocation did
not measure it, so a script can compare two files key by key without knowing which benchmarks
made them. A benchmark's own details go next to them under keys of its own.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# key -> what it is (docs/benchmarks.md has the table)
STABLE_KEYS: dict[str, str] = {
    "overhead_bound_vs_best_peer": "examples/s with no rate limit, datacreator / the best peer (run: peers)",
    "at_limit_vs_best_peer": "examples/s at the provider's rate limit, datacreator / the best peer (run: peers)",
    "added_latency_p50_ms": "per call at zero LLM latency (services and broker saturated), task -> examples topic minus the LLM's own time, median (run: overhead)",
    "added_latency_p99_ms": "the same, 99th percentile (run: overhead)",
    "quota_used": "share of the binding rate limit used, the lowest over the replica counts run (run: quota; rate_limit)",
    "share_429": "share of calls answered 429, the highest over the replica counts run (run: quota; rate_limit)",
    "scaling_100k_examples_per_s": "examples/s of one 100k-example request on the embedded stack (run --full: scaling)",
    "first_run_s": "install plus the README's first command on a fresh clone with empty caches (first_run)",
    "embedded_examples_per_min": "examples accepted per minute on the embedded LLM, first model asked for (models; first_run: its first command)",
    "overhead_bound_share_of_bound": "examples/s with no rate limit / the concurrency bound (calls in flight x examples per call / latency) (run: peers)",
    "overhead_bound_added_latency_p50_ms": "per call with no rate limit, task -> examples topic minus the LLM's own time, median (run: peers)",
    "overhead_bound_added_latency_p99_ms": "the same, 99th percentile (run: peers)",
}


def _number(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key} must be a number or None, not {type(value).__name__}")
    return None if math.isnan(value) or math.isinf(value) else float(value)


def stable_results(values: Mapping[str, Any]) -> dict[str, float | None]:
    """Every stable key, in order: the measured value or None; a key not in STABLE_KEYS is an error."""
    unknown = sorted(set(values) - set(STABLE_KEYS))
    if unknown:
        raise KeyError(f"not stable result keys: {', '.join(unknown)}")
    return {key: _number(key, values.get(key)) for key in STABLE_KEYS}


def write_results(path: str | Path, values: Mapping[str, Any], benchmarks: list[str],
                  details: Mapping[str, Any] | None = None, machine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write results.json: the stable keys first, then which benchmarks ran, the machine and the details."""
    out: dict[str, Any] = dict(stable_results(values))
    clash = sorted(set(details or {}) & (set(STABLE_KEYS) | {"benchmarks", "written_at"}))
    if clash:
        raise KeyError(f"details may not use the keys {', '.join(clash)}")
    out["benchmarks"] = list(benchmarks)
    out["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if machine is not None:
        out["machine"] = dict(machine)
    out.update(details or {})
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return out

"""What the benchmarks share: the simulator in a child process, the task they all ask for, process
figures (CPU time, RSS) and the machine they ran on."""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import subprocess
import sys
import uuid
from typing import Any

import httpx

from datacreator.embedded.broker import EmbeddedBroker

SEED_EXAMPLE = {
    "question": "Where would you most likely keep frozen peas?",
    "options": {"A": "In a bookshelf", "B": "In a freezer", "C": "In a garden shed", "D": "In a car glovebox"},
    "answer": "B",
}
INSTRUCTION = "Create commonsense multiple-choice questions with options A to D and the letter of the right answer."
MAX_TOKENS = 1024


def single_record_profile() -> dict[str, dict[str, Any]]:
    """The embedded broker's client profile as it was before its producers batched: one record per
    batch, so that ListOffsets (which answers the last batch's first record + 1 on Tansu) was right
    without `bus.ends` reading the ends from a fetch. Measured against the profile as shipped."""
    profile = EmbeddedBroker.client_overrides()
    del profile["broker"]
    profile["producer"] = {**profile["producer"], "max_batch_size": 1}
    return profile


class SimulatorProcess:
    """`python -m datacreator.simulator` in a child process (its own GIL), reconfigured through /sim/*."""

    def __init__(self, **config: Any) -> None:
        cmd = [sys.executable, "-m", "datacreator.simulator", "--port", "0", "--log-level", "critical"]
        for name, value in config.items():
            cmd += [f"--{name.replace('_', '-')}", "none" if value is None else str(value)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"(http://\S+/v1)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"the simulator did not start: {line!r}")
        self.base_url = match.group(1)
        self.root = self.base_url[: -len("/v1")]
        self._http = httpx.Client(timeout=30)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def configure(self, **changes: Any) -> dict[str, Any]:
        response = self._http.post(f"{self.root}/sim/config", json=changes)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        self._http.post(f"{self.root}/sim/reset").raise_for_status()

    def stats(self) -> dict[str, Any]:
        response = self._http.get(f"{self.root}/sim/stats")
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if hasattr(self, "_http"):
            self._http.close()


def call_counts(stats: dict[str, Any]) -> dict[str, int]:
    """Calls the simulator answered, the 429s among them and the answers a client retries (429s and 5xx)."""
    responses = {int(k): int(v) for k, v in stats["responses"].items()}
    retried = sum(n for code, n in responses.items() if code == 429 or code >= 500)
    return {"calls": sum(responses.values()), "ok": responses.get(200, 0), "429": responses.get(429, 0), "retries": retried}


def make_task(task_id: str, seed: dict[str, Any] | None = None, **fields: Any) -> Any:
    """The benchmarks' one GenerationTask factory: a task made from `seed` (SEED_EXAMPLE by default),
    its schema and label inferred as the planner does; any other field can be given."""
    from datacreator.contracts import GenerationTask, ModelSpec, Reference, Strategy
    from datacreator.logic.shape import example_schema, infer_label

    seed = SEED_EXAMPLE if seed is None else seed
    field, space = infer_label(seed)
    values: dict[str, Any] = {
        "task_id": task_id, "request_id": "bench", "chain": 0, "step": 0, "strategy": Strategy.random,
        "instruction": INSTRUCTION, "references": [Reference(data=seed)], "num_examples": 5, "target_count": 1,
        "example_schema": example_schema(seed, field, space), "label_field": field, "label_space": space,
        "model": ModelSpec(),
    }
    values.update(fields)
    return GenerationTask(**values)


def peer_messages(examples_per_call: int, max_tokens: int = MAX_TOKENS) -> list[dict[str, str]]:
    """The prompt datacreator sends for the seed example, for the peers to send too (same tokens, same answers)."""
    from datacreator.contracts import ModelSpec, Strategy
    from datacreator.logic.prompt import build_messages

    task = make_task("peer", request_id="peer", strategy=Strategy.none, num_examples=examples_per_call,
                     model=ModelSpec(max_tokens=max_tokens))
    return build_messages(task)


def call_tokens(examples_per_call: int, max_tokens: int = MAX_TOKENS) -> int:
    """What one call costs against TPM when the provider counts prompt + max_tokens."""
    from datacreator.logic.prompt import estimate_call_tokens

    return estimate_call_tokens(peer_messages(examples_per_call, max_tokens), max_tokens)


async def run_then_stop(tasks: list[Any], seconds: float, settle_s: float, clients: list[Any]) -> None:
    """Let `tasks` (client workers) run for `seconds`, give calls sent before the end `settle_s` to
    come back, then cancel them and close the clients."""
    import asyncio

    await asyncio.sleep(seconds + settle_s)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.aclose()


async def delete_redis_keys(redis_url: str, patterns: list[str]) -> None:
    """Remove what a benchmark's limiters left in Redis: every key matching one of `patterns`."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        for pattern in patterns:
            keys = [k async for k in client.scan_iter(match=pattern)]
            if keys:
                await client.delete(*keys)
    finally:
        await client.aclose()


def unique_alias(prefix: str) -> str:
    """An endpoint alias of its own: the Redis rate-limit keys are per alias, so runs never share them."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def concurrency_bound(concurrency: int, per_call: int, latency_s: float) -> float:
    """Examples/s no client passes: calls in flight x examples per call / latency (none at 0 s)."""
    return concurrency * per_call / latency_s if latency_s else math.inf


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = math.nan
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(), "load_1m": round(load, 2)}


def print_side_by_side(rows: list[dict[str, Any]], key: str, names: list[str], time_field: str,
                       columns: list[tuple[str, str, str]]) -> None:
    """A markdown table of the mean of each column over each name's rows (`rows` keyed by `key`),
    ending with `time_field` against the first name's, as the runs alternated side by side."""
    def mean(name: str, field: str) -> float:
        return statistics.mean(r[field] for r in rows if r[key] == name)

    base = mean(names[0], time_field)
    print("| " + " | ".join([key, *(header for header, _, _ in columns), "time vs first"]) + " |")
    print("|" + "---|" * (len(columns) + 2))
    for name in names:
        cells = [format(mean(name, field), fmt) for _, field, fmt in columns]
        print("| " + " | ".join([name, *cells, f"{mean(name, time_field) / base:.2f}"]) + " |")
    # The load at the end, beside the one printed at the start, says how noisy the run was.
    print(f"load: {os.getloadavg()}", flush=True)

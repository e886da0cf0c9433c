"""Do 429s cluster when the provider lowers its limit mid-run?

Two generator replicas (LLM clients with their own Redis limiters on one shared key, as generator
replicas run) saturate the simulator, configured with the provider's limits as they were. After
`--change-at` seconds the simulator halves its RPM and TPM (`--factor`), as a provider does when it
moves a key to a lower tier; the clients' configuration keeps the old limits. Three runs side by side:

- `follows limit`: the generator as it runs: the limit the provider announces in
  `x-ratelimit-limit-*` is enforced by every replica (shared in Redis), and a 429's Retry-After
  (or its `x-ratelimit-reset-*`) pauses the endpoint in Redis for every replica;
- `shared hold`: the pause only, the announced limit ignored (the generator before it followed it);
- `no hold`: neither, so only the refused call waits (the generator before the hold was used).

The table counts the simulator's 429 answers per window before and after the change, the most in
any one second after it, and what was admitted after the change against the new limit.

    python -m benchmarks limit_change                          # 5 s window, 45 s runs
    python -m benchmarks limit_change --window 10 --duration 90 --change-at 30
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import SimulatorProcess, delete_redis_keys, machine, run_then_stop
from benchmarks.rate_limit import make_task
from datacreator.config import EndpointConfig
from datacreator.llm.client import LLMClient
from datacreator.logic.prompt import build_messages, estimate_call_tokens
from datacreator.logic.retry import CircuitBreaker, RetryPolicy
from datacreator.ratelimit import ProviderView, RateLimiter, RedisRateLimiter


class HoldOnlyLimiter(RedisRateLimiter):
    """The shared limiter that ignores the limit the provider announces: only a 429 tells it."""

    def _follow(self, view: ProviderView) -> None:
        return None


class NoHoldLimiter(HoldOnlyLimiter):
    """Without the shared pause either: a 429 delays only the call it answered."""

    async def hold(self, seconds: float) -> None:
        return None


@dataclass
class Result:
    name: str
    windows_before: list[int]  # 429s per window before the change
    windows_after: list[int]  # 429s per window after it
    peak_429_per_s: int  # after the change
    calls_after: int
    admitted_after: int
    new_limit_per_window: int
    peak_admitted_after: int
    failed_tasks: int
    per_second: list[int] = field(default_factory=list)

    @property
    def refused_after(self) -> int:
        return sum(self.windows_after)

    @property
    def share_429_after(self) -> float:
        return self.refused_after / self.calls_after if self.calls_after else 0.0

    def used_after(self, windows: int) -> float:
        return self.admitted_after / (self.new_limit_per_window * windows) if windows else math.nan


def per_bucket(times: list[float], start: float, width: float, count: int) -> list[int]:
    out = [0] * count
    for t in times:
        k = int((t - start) // width)
        if 0 <= k < count:
            out[k] += 1
    return out


async def one_run(name: str, sim: SimulatorProcess, limiters: list[RateLimiter], args: argparse.Namespace,
                  rpm: int, tpm: int) -> Result:
    await asyncio.to_thread(sim.configure, rpm=rpm, tpm=tpm)
    await asyncio.to_thread(sim.reset)
    cfg = EndpointConfig(base_url=sim.base_url, model="bench", max_concurrency=args.concurrency, structured_output="json_object",
                         read_timeout_s=30, total_timeout_s=max(120.0, 3 * args.window))
    clients = [LLMClient(f"bench-{i}", cfg, limiter, RetryPolicy(max_attempts=8),
                         CircuitBreaker(failure_threshold=1000, alias=f"bench-{i}")) for i, limiter in enumerate(limiters)]
    new_rpm, new_tpm = max(1, int(rpm * args.factor)), max(1, int(tpm * args.factor))
    failed = 0
    start = time.monotonic()  # CLOCK_MONOTONIC is system-wide: the simulator's times compare with it
    deadline = start + args.duration
    changed_at = start + args.change_at

    async def worker(client: LLMClient) -> None:
        nonlocal failed
        while time.monotonic() < deadline:
            result = await client.complete(make_task(args.max_tokens))
            failed += not result.ok

    async def change() -> None:
        await asyncio.sleep(max(changed_at - time.monotonic(), 0.0))
        await asyncio.to_thread(sim.configure, rpm=new_rpm, tpm=new_tpm)

    tasks = [asyncio.create_task(worker(c)) for c in clients for _ in range(args.concurrency)]
    tasks.append(asyncio.create_task(change()))
    await run_then_stop(tasks, args.duration, args.latency * 3, clients)

    stats = await asyncio.to_thread(sim.stats)
    refused: list[float] = stats["refused_at"]
    admitted: list[float] = stats["admitted_at"]
    before = int(args.change_at // args.window)
    after = int((args.duration - args.change_at) // args.window)
    windows_after = per_bucket(refused, changed_at, args.window, after)
    seconds_after = per_bucket(refused, changed_at, 1.0, int(args.duration - args.change_at))
    admitted_after = per_bucket(admitted, changed_at, args.window, after)
    # Calls after the change: what was admitted plus what was refused, in the same windows.
    return Result(
        name=name,
        windows_before=per_bucket(refused, changed_at - before * args.window, args.window, before),
        windows_after=windows_after,
        peak_429_per_s=max(seconds_after, default=0),
        calls_after=sum(admitted_after) + sum(windows_after),
        admitted_after=sum(admitted_after),
        new_limit_per_window=new_rpm,
        peak_admitted_after=max(admitted_after, default=0),
        failed_tasks=failed,
        per_second=seconds_after,
    )


def print_table(results: list[Result], args: argparse.Namespace, rpm: int, tpm: int) -> None:
    after = int((args.duration - args.change_at) // args.window)
    info = machine()
    print()
    print(f"{info['nproc']} cores, {info['cpu']}, load {info['load_1m']}; 2 replicas x {args.concurrency} concurrent calls; "
          f"latency {args.latency:g} s; window {args.window:g} s; limit {rpm} req / {tpm} tok per window, "
          f"x{args.factor:g} at {args.change_at:g} s of {args.duration:g} s (configured: the old limit)")
    header = (f"{'run':<14} {'429s per window before':<24} {'429s per window after the change':<40} {'peak/s':>6} "
              f"{'429 share after':>16} {'admitted/new limit':>19} {'peak window':>12} {'failed':>7}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.name:<14} {' '.join(map(str, r.windows_before)):<24} {' '.join(map(str, r.windows_after)):<40} "
              f"{r.peak_429_per_s:>6} {f'{r.share_429_after:.1%} ({r.refused_after}/{r.calls_after})':>16} "
              f"{r.used_after(after):>19.1%} {f'{r.peak_admitted_after}/{r.new_limit_per_window}':>12} {r.failed_tasks:>7}")
    print()
    for r in results:
        print(f"{r.name}: 429s per second after the change: {' '.join(map(str, r.per_second))}")


async def main_async(args: argparse.Namespace) -> int:
    per_call = estimate_call_tokens(build_messages(make_task(args.max_tokens)), args.max_tokens)
    rpm = args.rpm
    tpm = int(rpm * per_call * 1.1)  # tokens leave 10% headroom: requests bind, before and after
    sim = SimulatorProcess(rpm=rpm, tpm=tpm, rate_window_s=args.window, latency="normal", latency_s=args.latency,
                           latency_sd_s=args.latency / 4)
    prefixes: list[str] = []
    results: list[Result] = []
    try:
        runs = (("follows limit", RedisRateLimiter), ("shared hold", HoldOnlyLimiter), ("no hold", NoHoldLimiter))
        for name, kind in runs:
            prefix = f"bench:ratelimit:{uuid.uuid4().hex}"
            prefixes.append(prefix)
            limiters: list[Any] = [kind(args.redis_url, prefix, rpm, tpm, window_s=args.window, alias=f"bench-{i}") for i in range(2)]
            results.append(await one_run(name, sim, limiters, args, rpm, tpm))  # the clients close their limiters
            print(f"  done: {name}", file=sys.stderr)
    finally:
        sim.stop()
        await delete_redis_keys(args.redis_url, [f"{{{prefix}}}*" for prefix in prefixes])
    print_table(results, args, rpm, tpm)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rpm", type=int, default=120, help="Requests per window before the change (default: %(default)s).")
    parser.add_argument("--window", type=float, default=5.0, help="Rate-limit window in seconds (default: %(default)s).")
    parser.add_argument("--duration", type=float, default=45.0, help="Seconds per run (default: %(default)s).")
    parser.add_argument("--change-at", type=float, default=15.0, help="When the provider lowers its limits (default: %(default)s).")
    parser.add_argument("--factor", type=float, default=0.5, help="New limit / old limit (default: %(default)s).")
    parser.add_argument("--concurrency", type=int, default=16, help="Concurrent calls per replica (default: %(default)s).")
    parser.add_argument("--latency", type=float, default=0.3, help="Mean simulated latency in seconds (default: %(default)s).")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    if not 0 < args.change_at < args.duration:
        parser.error("--change-at must fall inside the run")
    return asyncio.run(main_async(args))


def cli() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(cli())

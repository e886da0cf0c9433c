"""How much of a provider's rate limit the generator uses, and how often it is refused.

Starts the LLM simulator (its own process) with requests- and tokens-per-window limits, then
saturates it with 1 replica and then 2 replicas: LLMClient instances with separate
RedisRateLimiter objects sharing one Redis key, as generator replicas do. Prints, for each, the
share of the limit used (goal >= 97%) and the share of calls answered 429 (goal <= 0.5%), from the
simulator's own counts, and the most requests and tokens the simulator admitted in any window
(goal <= 100% of the limit). With --outage S, 2 replicas also run through fault-injecting TCP
proxies to Redis that are cut for S seconds mid-run (each replica falls back to its local share,
then returns), next to the same run without an outage.

    python -m benchmarks rate_limit                                   # 60 s window, 2 minutes per run
    python -m benchmarks rate_limit --window 2 --duration 10 --rpm 60 # a quick check
    python -m benchmarks rate_limit --window 10 --duration 40 --rpm 100 --replicas 2 --outage 10
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from dataclasses import dataclass

from benchmarks import common
from benchmarks.common import SimulatorProcess, delete_redis_keys, run_then_stop
from datacreator.config import EndpointConfig
from datacreator.contracts import GenerationTask, ModelSpec
from datacreator.llm.client import LLMClient
from datacreator.logic.prompt import build_messages, estimate_call_tokens
from datacreator.logic.retry import CircuitBreaker, RetryPolicy
from datacreator.ratelimit import FailoverRateLimiter, LocalRateLimiter, RateLimiter, RedisRateLimiter, max_in_window
from tests.fixtures.tcp_proxy import TcpProxy

EXAMPLE = {"question": "Which planet is known as the red planet?", "options": {"A": "Venus", "B": "Mars", "C": "Jupiter"}, "answer": "B"}


def make_task(max_tokens: int) -> GenerationTask:
    return common.make_task(uuid.uuid4().hex, EXAMPLE, instruction="Write multiple-choice science questions for children.",
                            num_examples=3, target_count=1_000_000, example_schema={"type": "object"}, label_field="answer",
                            label_space=["A", "B", "C"], model=ModelSpec(max_tokens=max_tokens))


@dataclass
class Row:
    name: str
    calls: int
    admitted: int
    refused_429: int
    request_share: float
    token_share: float | None
    max_in_window: int
    max_tokens_in_window: int
    failed_tasks: int

    @property
    def binding(self) -> str:
        return "token" if self.token_share is not None and self.token_share > self.request_share else "request"

    @property
    def limit_share(self) -> float:
        """The share of whichever limit binds."""
        return max(self.request_share, self.token_share or 0.0)

    @property
    def share_429(self) -> float:
        return self.refused_429 / self.calls if self.calls else 0.0


async def run(
    name: str, sim: SimulatorProcess, limiters: list[RateLimiter], args: argparse.Namespace, tpm: int | None,
    proxies: list[TcpProxy] | None = None,
) -> Row:
    await asyncio.to_thread(sim.reset)
    cfg = EndpointConfig(
        base_url=sim.base_url, model="bench", max_concurrency=args.concurrency, structured_output="json_object",
        read_timeout_s=30, total_timeout_s=max(120.0, 3 * args.window),
    )
    clients = [
        LLMClient(f"bench-{i}", cfg, limiter, RetryPolicy(max_attempts=8), CircuitBreaker(failure_threshold=1000, alias=f"bench-{i}"))
        for i, limiter in enumerate(limiters)
    ]
    failed = 0
    deadline = time.monotonic() + args.duration

    async def worker(client: LLMClient) -> None:
        nonlocal failed
        while time.monotonic() < deadline:
            result = await client.complete(make_task(args.max_tokens))
            failed += not result.ok

    async def outage() -> None:
        await asyncio.sleep(max(args.duration / 2 - args.outage / 2, 0.0))
        for proxy in proxies or []:
            await proxy.cut()
        await asyncio.sleep(args.outage)
        for proxy in proxies or []:
            await proxy.start()

    tasks = [asyncio.create_task(worker(c)) for c in clients for _ in range(args.concurrency)]
    if proxies:
        tasks.append(asyncio.create_task(outage()))
    await run_then_stop(tasks, args.duration, args.latency * 3, clients)  # calls sent before the end come back

    stats = await asyncio.to_thread(sim.stats)
    admitted_at: list[float] = stats["admitted_at"]
    costs: list[int] = stats["admitted_tokens"]
    start = min(admitted_at) if admitted_at else 0.0
    # Count what was admitted during `duration` from the first admission: a perfect limiter
    # admits exactly rpm * duration / window there.
    in_run = [(t, c) for t, c in zip(admitted_at, costs) if t < start + args.duration]
    periods = args.duration / args.window
    calls = sum(int(n) for n in stats["responses"].values())
    return Row(
        name=name,
        calls=calls,
        admitted=len(in_run),
        refused_429=int(stats["responses"].get("429", 0)),
        request_share=len(in_run) / (args.rpm * periods),
        token_share=sum(c for _, c in in_run) / (tpm * periods) if tpm else None,
        max_in_window=int(max_in_window(admitted_at, args.window)),
        max_tokens_in_window=int(max_in_window(admitted_at, args.window, costs)),
        failed_tasks=failed,
    )


def print_table(rows: list[Row], args: argparse.Namespace, tpm: int | None) -> None:
    print()
    print(f"rpm {args.rpm}, tpm {tpm or '-'} per {args.window:g} s window; {args.duration:g} s per run; "
          f"{args.concurrency} concurrent calls per replica; simulated latency {args.latency:g} s")
    header = (f"{'run':<30} {'calls':>7} {'admitted':>9} {'limit used':>11} {'tokens used':>12} {'429s':>7} {'429 share':>10} "
              f"{'max/window':>11} {'peak req':>9} {'peak tok':>9} {'failed':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        tokens = f"{r.token_share:.1%}" if r.token_share is not None else "-"
        peak_tokens = f"{r.max_tokens_in_window / tpm:.1%}" if tpm else "-"
        print(f"{r.name:<30} {r.calls:>7} {r.admitted:>9} {r.request_share:>11.1%} {tokens:>12} {r.refused_429:>7} "
              f"{r.share_429:>10.2%} {f'{r.max_in_window}/{args.rpm}':>11} {r.max_in_window / args.rpm:>9.1%} {peak_tokens:>9} "
              f"{r.failed_tasks:>7}")
    print()
    summary = "; ".join(f"{r.name}: {r.limit_share:.1%} of the {r.binding} limit used, {r.share_429:.2%} 429s" for r in rows)
    ok = all(r.limit_share >= 0.97 and r.share_429 <= 0.005 and r.max_in_window <= args.rpm for r in rows if "outage" not in r.name)
    for r in rows:
        if "outage" in r.name:
            held = r.max_in_window <= args.rpm and (not tpm or r.max_tokens_in_window <= tpm)
            print(f"{r.name}: peak {r.max_in_window}/{args.rpm} requests, {r.max_tokens_in_window}/{tpm or '-'} tokens "
                  f"in any {args.window:g} s window [{'held' if held else 'NOT held'}: <= 100% of the limit]")
    print(f"Summary ({args.rpm} rpm per {args.window:g} s, {args.duration:g} s runs): {summary} "
          f"[{'goals met' if ok else 'goals NOT met'}: >=97% used, <=0.5% 429s]")


async def main_async(args: argparse.Namespace) -> int:
    per_call = estimate_call_tokens(build_messages(make_task(args.max_tokens)), args.max_tokens)
    # By default tokens leave 10% headroom, so requests are the limit that binds.
    tpm = args.tpm if args.tpm is not None else int(args.rpm * per_call * 1.1)
    tpm = tpm or None
    sim = SimulatorProcess(
        rpm=args.rpm, tpm=tpm, rate_window_s=args.window,
        latency="normal", latency_s=args.latency, latency_sd_s=args.latency / 4,
    )
    rows: list[Row] = []
    prefixes: list[str] = []
    try:
        if args.local:
            rows.append(await run("1 replica, local", sim, [LocalRateLimiter(args.rpm, tpm, window_s=args.window)], args, tpm))
        for replicas in args.replicas:
            prefix = f"bench:ratelimit:{uuid.uuid4().hex}"
            prefixes.append(prefix)
            limiters: list[RateLimiter] = [
                RedisRateLimiter(args.redis_url, prefix, args.rpm, tpm, window_s=args.window, alias=f"bench-{i}") for i in range(replicas)
            ]
            label = f"{replicas} replica{'s' if replicas > 1 else ''}, Redis"
            rows.append(await run(label, sim, limiters, args, tpm))
            print(f"  done: {label}", file=sys.stderr)
        if args.outage:
            prefix = f"bench:ratelimit:{uuid.uuid4().hex}"
            prefixes.append(prefix)
            proxies = [TcpProxy(), TcpProxy()]
            for proxy in proxies:
                await proxy.start()
            limiters = [
                FailoverRateLimiter(
                    RedisRateLimiter(proxy.url, prefix, args.rpm, tpm, window_s=args.window, alias=f"bench-{i}", op_timeout_s=0.5),
                    initial_replicas=1, probe_interval_s=1.0,
                )
                for i, proxy in enumerate(proxies)
            ]
            label = f"2 replicas, {args.outage:g} s outage"
            try:
                rows.append(await run(label, sim, limiters, args, tpm, proxies))
            finally:
                for proxy in proxies:
                    await proxy.cut()
            print(f"  done: {label}", file=sys.stderr)
    finally:
        sim.stop()
        await delete_redis_keys(args.redis_url, [f"{{{prefix}}}*" for prefix in prefixes])
    print_table(rows, args, tpm)
    if args.results:
        from benchmarks.common import machine
        from benchmarks.results import write_results

        write_results(args.results, headline(rows), ["rate_limit"],
                      {"rate_limit": [{**r.__dict__, "share_429": r.share_429, "limit_share": r.limit_share} for r in rows]},
                      machine())
    return 0


def headline(rows: list[Row]) -> dict[str, float | None]:
    """quota_used (lowest) and share_429 (highest) over the runs without an outage."""
    steady = [r for r in rows if "outage" not in r.name]
    if not steady:
        return {}
    return {"quota_used": min(r.limit_share for r in steady), "share_429": max(r.share_429 for r in steady)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rpm", type=int, default=600, help="Requests allowed per window (default: %(default)s).")
    parser.add_argument("--tpm", type=int, default=None, help="Tokens allowed per window; default: 10%% above what rpm calls cost; 0: none.")
    parser.add_argument("--window", type=float, default=60.0, help="Rate-limit window in seconds (default: %(default)s).")
    parser.add_argument("--duration", type=float, default=120.0, help="Seconds per run (default: %(default)s).")
    parser.add_argument("--concurrency", type=int, default=64, help="Concurrent calls per replica (default: %(default)s).")
    parser.add_argument("--latency", type=float, default=0.3, help="Mean simulated latency in seconds (default: %(default)s).")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of each call (default: %(default)s).")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="Replica counts to run (default: 1 2).")
    parser.add_argument("--outage", type=float, default=0.0, help="Also run 2 replicas with Redis cut for this many seconds mid-run.")
    parser.add_argument("--local", action="store_true", help="Also run one replica with the in-process limiter.")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--results", help="write results.json (stable keys, benchmarks/results.py) to this file")
    args = parser.parse_args()
    return asyncio.run(main_async(args))



def cli() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(cli())

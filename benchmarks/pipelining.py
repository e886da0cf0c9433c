"""The curator's publishing, side by side, overhead-bound: pipelined against serial, or batched
records on the embedded broker against one record per batch.

    python -m benchmarks pipelining [--compare pipelining|batching] [--rounds 3] [--n 2000] [--latency 0.5] [--concurrency 32]

The simulator answers every call after a fixed latency, with no rate limit; datacreator runs one
request of N examples, 5 a call, with 32 concurrent calls (the endpoint's max_concurrency) and
twice as many chains, as in the overhead-bound regime of `run`'s peers section. Each round runs
two variants, each on an embedded stack of its own. `--compare pipelining` (the default):

- pipelined: the curator as shipped (`CuratorHandler.pipelined = True`): candidates curated in
  order, their outputs acknowledged in the background (bus/runtime.py);
- serial: `pipelined = False`: each candidate's outputs published, and awaited, before the next
  candidate of its partition is curated.

`--compare batching` (both pipelined):

- batched: the embedded broker's profile as shipped (`EmbeddedBroker.client_overrides()`):
  producers batch, and the bus reads a partition's end from a fetch (`bus.ends`);
- single-record: every producer sends one record per batch (`max_batch_size=1`), as the profile
  did before, with the curator's acknowledgements spread over `PIPELINE_PRODUCERS` producers.

Which runs first alternates from round to round, so that a drift in the machine's load falls on
both. Per run it prints examples/s and their share of the concurrency bound (calls in flight x
examples per call / latency), the latency added per call (task published -> its first example on
the examples topic, minus the LLM's own time: `run.call_times`, as in the overhead section) at
p50 and p99, and the curator's hop (candidate -> first example) at p50; then a table of both
side by side with the ratios of the first variant to the second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import common, run
from datacreator.handlers.curator import CuratorHandler
from datacreator.serve import CORE_SERVICES
from datacreator.stack import EmbeddedStack


@dataclass(frozen=True)
class Variant:
    pipelined: bool
    profile: dict[str, dict[str, Any]] | None = None  # None: the embedded broker's own


# Each comparison: (the variant measured, the one it is measured against).
COMPARISONS: dict[str, tuple[str, str]] = {"pipelining": ("pipelined", "serial"), "batching": ("batched", "single-record")}
VARIANTS: dict[str, Variant] = {
    "pipelined": Variant(True),
    "serial": Variant(False),
    "batched": Variant(True),
    "single-record": Variant(True, common.single_record_profile()),
}


@dataclass
class Measure:
    round: int
    variant: str
    examples: int
    wall_s: float
    examples_per_s: float
    bound_share: float
    added_ms: dict[str, float]
    curator_ms: dict[str, float]
    load_1m: float


@contextlib.contextmanager
def curator_pipelined(on: bool) -> Iterator[None]:
    """The curator's runner reads `pipelined` when it starts (its extra producers) and per record,
    so the flag holds for the stack's whole life."""
    saved = CuratorHandler.pipelined
    CuratorHandler.pipelined = on
    try:
        yield
    finally:
        CuratorHandler.pipelined = saved


def bound(args: argparse.Namespace) -> float:
    """Examples/s no client passes: calls in flight x examples per call / latency (none at 0 s:
    `--latency 0` measures the bus alone, as `run`'s scaling section does)."""
    return common.concurrency_bound(args.concurrency, args.per_call, args.latency)


async def one_run(bench: run.Bench, args: argparse.Namespace, number: int, variant: str) -> Measure:
    alias = common.unique_alias("pipe")
    bench.aliases.append(alias)
    settings = bench.settings({alias: bench.endpoint(None, None, concurrency=args.concurrency)})
    bench.sim.configure(rpm=None, tpm=None, latency="fixed", latency_s=args.latency)
    bench.sim.reset()
    chosen = VARIANTS[variant]
    with curator_pipelined(chosen.pipelined):
        stack = EmbeddedStack(settings, services=CORE_SERVICES)
        if chosen.profile is not None:
            profile = chosen.profile
            stack.broker.client_overrides = lambda: profile  # type: ignore[method-assign]
        live = await run.start_stack(stack)
        try:
            req = run.request(args.n, alias, chains=2 * args.concurrency, per_call=args.per_call)
            final, wall = await run.run_to_end(live, req)
            times = await run.call_times(live, req.request_id)
        finally:
            await run.stop_stack(stack)
    rate = final.accepted / wall if wall else 0.0
    measure = Measure(number, variant, final.accepted, wall, rate, rate / bound(args), run.p50_p99_ms(times.added),
                      run.p50_p99_ms(times.curator), common.machine()["load_1m"])
    print(f"  round {number} {variant:<13} {describe(measure, args)}", file=sys.stderr, flush=True)
    return measure


def of_bound(m: Measure, args: argparse.Namespace, named: bool = False) -> str:
    """The share of the concurrency bound, as " (89%)" or, `named`, " (89% of 320)", where there is
    one (not at --latency 0)."""
    if not args.latency:
        return ""
    return f" ({m.bound_share:.0%} of {bound(args):.0f})" if named else f" ({m.bound_share:.0%})"


def describe(m: Measure, args: argparse.Namespace) -> str:
    return (f"{m.examples_per_s:.0f} ex/s{of_bound(m, args, named=True)}, "
            f"added p50 / p99 {m.added_ms['p50']:.0f} / {m.added_ms['p99']:.0f} ms, "
            f"curator hop p50 {m.curator_ms['p50']:.0f} ms, {m.examples} ex in {m.wall_s:.1f} s, load {m.load_1m}")


def ratios(a: Measure, b: Measure) -> dict[str, float]:
    """a / b: above 1 is better for examples/s, below 1 for latency."""
    def over(x: float, y: float) -> float:
        return x / y if y else float("nan")

    return {"examples_per_s": over(a.examples_per_s, b.examples_per_s),
            "added_p50": over(a.added_ms["p50"], b.added_ms["p50"]),
            "added_p99": over(a.added_ms["p99"], b.added_ms["p99"])}


def print_table(rounds: list[dict[str, Measure]], args: argparse.Namespace, header: str) -> list[dict[str, float]]:
    """One line per round, both variants side by side; the ratios of each round, returned."""
    a_name, b_name = COMPARISONS[args.compare]
    cols = ("round", "first", f"{b_name}: ex/s (of bound)", "added p50 / p99", "hop p50",
            f"{a_name}: ex/s (of bound)", "added p50 / p99", "hop p50", f"{a_name}/{b_name}: ex/s", "p50", "p99")
    lines: list[tuple[str, ...]] = [cols]
    out = []
    for i, pair in enumerate(rounds, start=1):
        b, a = pair[b_name], pair[a_name]
        r = ratios(a, b)
        out.append(r)
        lines.append((str(i), first_of(i, args.compare), f"{b.examples_per_s:.0f}{of_bound(b, args)}",
                      f"{b.added_ms['p50']:.0f} / {b.added_ms['p99']:.0f} ms", f"{b.curator_ms['p50']:.0f} ms",
                      f"{a.examples_per_s:.0f}{of_bound(a, args)}",
                      f"{a.added_ms['p50']:.0f} / {a.added_ms['p99']:.0f} ms", f"{a.curator_ms['p50']:.0f} ms",
                      f"{r['examples_per_s']:.2f}x", f"{r['added_p50']:.2f}x", f"{r['added_p99']:.2f}x"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    print()
    print(header)
    for number, line in enumerate(lines):
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(line, widths)).rstrip())
        if number == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    if len(out) > 1:
        medians = {key: statistics.median(r[key] for r in out) for key in out[0]}
        print(f"median over {len(out)} rounds, {a_name} / {b_name}: ex/s {medians['examples_per_s']:.2f}x, "
              f"added p50 {medians['added_p50']:.2f}x, added p99 {medians['added_p99']:.2f}x")
    if args.latency:
        print(f"bound: {args.concurrency} calls in flight x {args.per_call} examples / {args.latency:g} s = {bound(args):.0f} examples/s")
    return out


def first_of(number: int, compare: str = "pipelining") -> str:
    """The second variant first in odd rounds, the first one in even ones."""
    a_name, b_name = COMPARISONS[compare]
    return b_name if number % 2 else a_name


async def main_async(args: argparse.Namespace) -> int:
    info = common.machine()
    print(f"machine: {info['nproc']} cores, {info['cpu']}, load {info['load_1m']}; {args.compare}, {args.rounds} round(s) of "
          f"{args.n} examples, {args.concurrency} concurrent calls, fixed latency {args.latency:g} s", file=sys.stderr)
    started = time.monotonic()
    sim = common.SimulatorProcess()
    bench = run.Bench(run.Plan(concurrency=args.concurrency, examples_per_call=args.per_call), args.redis_url, sim)
    rounds: list[dict[str, Measure]] = []
    try:
        for number in range(1, args.rounds + 1):
            first = first_of(number, args.compare)
            order = [first, *(v for v in COMPARISONS[args.compare] if v != first)]
            rounds.append({variant: await one_run(bench, args, number, variant) for variant in order})
    finally:
        sim.stop()
        with contextlib.suppress(Exception):
            await common.delete_redis_keys(args.redis_url, [f"*datacreator:ratelimit:{alias}*" for alias in bench.aliases])
    end = common.machine()
    header = (f"curator {args.compare}, {len(rounds)} round(s), {time.monotonic() - started:.0f} s, on {end['nproc']} cores, "
              f"{end['cpu']}; load {info['load_1m']} at the start, {end['load_1m']} at the end")
    table = print_table(rounds, args, header)
    if args.results:
        from benchmarks.results import write_results

        details: dict[str, Any] = {"pipelining": {
            "compare": args.compare, "n": args.n, "latency_s": args.latency, "concurrency": args.concurrency, "examples_per_call": args.per_call,
            "bound_examples_per_s": bound(args) if args.latency else None, "rounds": [{v: asdict(m) for v, m in pair.items()} for pair in rounds],
            "ratios": "/".join(COMPARISONS[args.compare]), "ratios_per_round": table}}
        write_results(args.results, {}, ["pipelining"], details, end)
        print(f"results: {args.results}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="pipelining",
                        help="pipelined against serial curator, or batched against single-record producers (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each one run of both (default: %(default)s)")
    parser.add_argument("--n", type=int, default=2000, help="examples per run (default: %(default)s)")
    parser.add_argument("--latency", type=float, default=0.5, help="fixed simulated latency, s (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent LLM calls (default: %(default)s)")
    parser.add_argument("--per-call", type=int, default=5, help="examples per call (default: %(default)s)")
    parser.add_argument("--redis-url", default=os.environ.get("DATACREATOR_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--results", type=Path, help="write results.json (stable keys, benchmarks/results.py) to this file")
    parser.add_argument("--verbose", action="store_true", help="log the services' warnings")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.n < 1 or args.concurrency < 1 or args.per_call < 1 or args.latency < 0:
        parser.error("--rounds, --n, --concurrency and --per-call must be at least 1, --latency not negative (0: the bus alone)")
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(run.until_signalled(main_async(args)))


def cli() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(cli())

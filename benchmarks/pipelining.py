"""The curator's acknowledgements pipelined against serial publishing, side by side, overhead-bound.

    python -m benchmarks pipelining [--rounds 3] [--n 2000] [--latency 0.5] [--concurrency 32]

The simulator answers every call after a fixed latency, with no rate limit; datacreator runs one
request of N examples, 5 a call, with 32 concurrent calls (the endpoint's max_concurrency) and
twice as many chains, as in the overhead-bound regime of `run`'s peers section. Each round runs it
twice, each time on an embedded stack of its own:

- pipelined: the curator as shipped (`CuratorHandler.pipelined = True`): candidates curated in
  order, their outputs acknowledged in the background (bus/runtime.py);
- serial: `pipelined = False`: each candidate's outputs published, and awaited, before the next
  candidate of its partition is curated.

Which runs first alternates from round to round, so that a drift in the machine's load falls on
both. Per run it prints examples/s and their share of the concurrency bound (calls in flight x
examples per call / latency), the latency added per call (task published -> its first example on
the examples topic, minus the LLM's own time: `run.call_times`, as in the overhead section) at
p50 and p99, and the curator's hop (candidate -> first example) at p50; then a table of both
side by side with the ratios pipelined / serial.
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

VARIANTS: dict[str, bool] = {"pipelined": True, "serial": False}


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
    """Examples/s no client passes: calls in flight x examples per call / latency."""
    return args.concurrency * args.per_call / args.latency


async def one_run(bench: run.Bench, args: argparse.Namespace, number: int, variant: str) -> Measure:
    alias = common.unique_alias("pipe")
    bench.aliases.append(alias)
    settings = bench.settings({alias: bench.endpoint(None, None, concurrency=args.concurrency)})
    bench.sim.configure(rpm=None, tpm=None, latency="fixed", latency_s=args.latency)
    bench.sim.reset()
    with curator_pipelined(VARIANTS[variant]):
        stack = EmbeddedStack(settings, services=CORE_SERVICES)
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
    print(f"  round {number} {variant:<9} {describe(measure, args)}", file=sys.stderr, flush=True)
    return measure


def describe(m: Measure, args: argparse.Namespace) -> str:
    return (f"{m.examples_per_s:.0f} ex/s ({m.bound_share:.0%} of {bound(args):.0f}), "
            f"added p50 / p99 {m.added_ms['p50']:.0f} / {m.added_ms['p99']:.0f} ms, "
            f"curator hop p50 {m.curator_ms['p50']:.0f} ms, {m.examples} ex in {m.wall_s:.1f} s, load {m.load_1m}")


def ratios(pipelined: Measure, serial: Measure) -> dict[str, float]:
    """pipelined / serial: above 1 is better for examples/s, below 1 for latency."""
    def over(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {"examples_per_s": over(pipelined.examples_per_s, serial.examples_per_s),
            "added_p50": over(pipelined.added_ms["p50"], serial.added_ms["p50"]),
            "added_p99": over(pipelined.added_ms["p99"], serial.added_ms["p99"])}


def print_table(rounds: list[dict[str, Measure]], args: argparse.Namespace, header: str) -> list[dict[str, float]]:
    """One line per round, serial and pipelined side by side; the ratios of each round, returned."""
    cols = ("round", "first", "serial: ex/s (of bound)", "added p50 / p99", "hop p50",
            "pipelined: ex/s (of bound)", "added p50 / p99", "hop p50", "pipelined/serial: ex/s", "p50", "p99")
    lines: list[tuple[str, ...]] = [cols]
    out = []
    for i, pair in enumerate(rounds, start=1):
        s, p = pair["serial"], pair["pipelined"]
        r = ratios(p, s)
        out.append(r)
        lines.append((str(i), first_of(i), f"{s.examples_per_s:.0f} ({s.bound_share:.0%})",
                      f"{s.added_ms['p50']:.0f} / {s.added_ms['p99']:.0f} ms", f"{s.curator_ms['p50']:.0f} ms",
                      f"{p.examples_per_s:.0f} ({p.bound_share:.0%})",
                      f"{p.added_ms['p50']:.0f} / {p.added_ms['p99']:.0f} ms", f"{p.curator_ms['p50']:.0f} ms",
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
        print(f"median over {len(out)} rounds, pipelined / serial: ex/s {medians['examples_per_s']:.2f}x, "
              f"added p50 {medians['added_p50']:.2f}x, added p99 {medians['added_p99']:.2f}x")
    print(f"bound: {args.concurrency} calls in flight x {args.per_call} examples / {args.latency:g} s = {bound(args):.0f} examples/s")
    return out


def first_of(number: int) -> str:
    """Serial first in odd rounds, pipelined first in even ones."""
    return "serial" if number % 2 else "pipelined"


async def main_async(args: argparse.Namespace) -> int:
    info = common.machine()
    print(f"machine: {info['nproc']} cores, {info['cpu']}, load {info['load_1m']}; {args.rounds} round(s) of "
          f"{args.n} examples, {args.concurrency} concurrent calls, fixed latency {args.latency:g} s", file=sys.stderr)
    started = time.monotonic()
    sim = common.SimulatorProcess()
    bench = run.Bench(run.Plan(concurrency=args.concurrency, examples_per_call=args.per_call), args.redis_url, sim)
    rounds: list[dict[str, Measure]] = []
    try:
        for number in range(1, args.rounds + 1):
            first = first_of(number)
            order = [first, *(v for v in VARIANTS if v != first)]
            rounds.append({variant: await one_run(bench, args, number, variant) for variant in order})
    finally:
        sim.stop()
        with contextlib.suppress(Exception):
            await common.delete_redis_keys(args.redis_url, [f"*datacreator:ratelimit:{alias}*" for alias in bench.aliases])
    end = common.machine()
    header = (f"curator pipelining, {len(rounds)} round(s), {time.monotonic() - started:.0f} s, on {end['nproc']} cores, "
              f"{end['cpu']}; load {info['load_1m']} at the start, {end['load_1m']} at the end")
    table = print_table(rounds, args, header)
    if args.results:
        from benchmarks.results import write_results

        details: dict[str, Any] = {"pipelining": {
            "n": args.n, "latency_s": args.latency, "concurrency": args.concurrency, "examples_per_call": args.per_call,
            "bound_examples_per_s": bound(args), "rounds": [{v: asdict(m) for v, m in pair.items()} for pair in rounds],
            "ratios_pipelined_over_serial": table}}
        write_results(args.results, {}, ["pipelining"], details, end)
        print(f"results: {args.results}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each one run of both (default: %(default)s)")
    parser.add_argument("--n", type=int, default=2000, help="examples per run (default: %(default)s)")
    parser.add_argument("--latency", type=float, default=0.5, help="fixed simulated latency, s (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent LLM calls (default: %(default)s)")
    parser.add_argument("--per-call", type=int, default=5, help="examples per call (default: %(default)s)")
    parser.add_argument("--redis-url", default=os.environ.get("DATACREATOR_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--results", type=Path, help="write results.json (stable keys, benchmarks/results.py) to this file")
    parser.add_argument("--verbose", action="store_true", help="log the services' warnings")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.n < 1 or args.concurrency < 1 or args.per_call < 1 or args.latency <= 0:
        parser.error("--rounds, --n, --concurrency and --per-call must be at least 1, --latency positive")
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(run.until_signalled(main_async(args)))


def cli() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(cli())

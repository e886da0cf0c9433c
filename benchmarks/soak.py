"""Memory over many small requests: RSS of the services after every 100 requests.

Every service (planner, generator, curator, sink) runs in this process on the embedded broker, the
LLM simulator in a child process. N requests of a few examples each go through, C at a time; after
each hundred the table shows this process's RSS and what the services still hold: plans, statuses
held by the watchers, requests held by the sink, the curator's dedup requests. With the release of
ended requests (`final_state_ttl_s`) those stay near what ended in the last `ttl` seconds and RSS
levels off; `--ttl 1e9` keeps everything, as before the release existed.

    python -m benchmarks soak                     # 1,000 requests, ttl 5 s
    python -m benchmarks soak --requests 300 --ttl 1e9
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import common
from datacreator.bus.codec import encode, encode_key
from datacreator.bus.factory import make_producer
from datacreator.bus.readback import StatusWatcher
from datacreator.config import Settings
from datacreator.contracts import CreationRequest, ModelSpec, RequestStatus, Strategy
from datacreator.stack import EmbeddedStack

SERVICES = ("planner", "generator", "curator", "sink")


def held(stack: EmbeddedStack) -> dict[str, int]:
    """What the services hold per request, by service."""
    assert stack.group is not None
    out: dict[str, int] = {}
    for runner in stack.group.runners:
        handler: Any = runner.handler
        if handler.name == "planner":
            out["plans"] = len(handler.plans)
        elif handler.name == "generator":
            out["generator_statuses"] = len(handler.status.latest)
        elif handler.name == "curator":
            out["curator_statuses"] = len(handler.status.latest)
            out["curator_requests"] = len(handler.state.requests)
        elif handler.name == "sink":
            out["sink_requests"] = handler.held_requests()
    return out


async def soak(settings: Settings, stack: EmbeddedStack, alias: str, n: int, concurrency: int, target: int,
               report: Any) -> list[dict[str, Any]]:
    """Submit n requests, `concurrency` at a time; call `report(done, row)` after every hundred."""
    finals: dict[str, asyncio.Future[RequestStatus]] = {}

    def on_status(status: RequestStatus) -> None:
        waiter = finals.get(status.request_id)
        if waiter is not None and status.state.final and not waiter.done():
            waiter.set_result(status)

    watcher = await StatusWatcher(settings, on_status=on_status, release_after_s=settings.runtime.final_state_ttl_s).start()
    producer = make_producer(settings)
    await producer.start()
    rows: list[dict[str, Any]] = []
    slots = asyncio.Semaphore(concurrency)
    states: dict[str, int] = {}
    started = time.monotonic()
    done = 0

    async def one(number: int) -> None:
        nonlocal done
        async with slots:
            request = CreationRequest(
                request_id=f"soak-{number}-{uuid.uuid4().hex[:6]}", instruction=common.INSTRUCTION,
                formatting_example=common.SEED_EXAMPLE, target_count=target, examples_per_call=target, chains=1,
                strategy=Strategy.none, model=ModelSpec(endpoint=alias, max_tokens=256),
            )
            waiter = finals[request.request_id] = asyncio.get_running_loop().create_future()
            await producer.send_and_wait(settings.topics.requests, encode(request), key=encode_key(request.request_id))
            final = await asyncio.wait_for(waiter, 300)
            del finals[request.request_id]
            states[final.state.value] = states.get(final.state.value, 0) + 1
        done += 1
        if done % 100 == 0 or done == n:
            gc.collect()
            row = {"requests": done, "rss_mib": round(common.rss_mib(), 1),
                   "elapsed_s": round(time.monotonic() - started, 1), **held(stack), "states": dict(states)}
            rows.append(row)
            report(row)

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await producer.stop()
        await watcher.stop()
    return rows


def print_row(row: dict[str, Any]) -> None:
    print(f"  {row['requests']:>6,} requests  {row['elapsed_s']:>7.1f} s  RSS {row['rss_mib']:>7.1f} MiB  "
          f"plans {row.get('plans', 0):>4}  statuses g/c {row.get('generator_statuses', 0):>4}/{row.get('curator_statuses', 0):>4}  "
          f"sink {row.get('sink_requests', 0):>4}  curator {row.get('curator_requests', 0):>4}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> int:
    info = common.machine()
    print(f"machine: {info['nproc']} cores, {info['cpu']}, load {info['load_1m']}; {args.requests} requests of "
          f"{args.target} examples, {args.concurrency} at a time, ttl {args.ttl:g} s", file=sys.stderr)
    sim = common.SimulatorProcess()
    alias = common.unique_alias("soak")
    with tempfile.TemporaryDirectory(prefix="soak-sink-") as sink_dir:
        settings = Settings(
            endpoints_json=json.dumps({alias: {"base_url": sim.base_url, "model": "datacreator-simulator",
                                               "max_concurrency": 64}}),
            topic_partitions=4, final_state_ttl_s=args.ttl, snapshot_retention_s=args.ttl, sink_dir=sink_dir, sink_fsync=False,
            max_active_requests=max(100, args.concurrency * 2), shutdown_timeout_s=3.0,
            kafka_session_timeout_ms=6000,
        )
        stack = EmbeddedStack(settings, services=SERVICES)
        try:
            live = await asyncio.wait_for(stack.start(), 120)
            rows = await soak(live, stack, alias, args.requests, args.concurrency, args.target, print_row)
            broker_rss = common.rss_mib(stack.broker.pid)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stack.stop(), 60)
            sim.stop()
    after_first = [r["rss_mib"] for r in rows if r["requests"] >= 100]
    growth = after_first[-1] - after_first[0] if len(after_first) > 1 else 0.0
    summary = {"machine": common.machine(), "requests": args.requests, "ttl_s": args.ttl, "rows": rows,
               "rss_growth_after_first_100_mib": round(growth, 1), "broker_rss_mib": round(broker_rss, 1)}
    print(f"RSS after the first 100 requests grew {growth:+.1f} MiB over {args.requests - 100} more; "
          f"broker RSS {broker_rss:.0f} MiB", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20, help="requests in flight at once")
    parser.add_argument("--target", type=int, default=3, help="examples per request (one call each)")
    parser.add_argument("--ttl", type=float, default=5.0, help="final_state_ttl_s of the services (1e9: keep all)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))


def cli() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(cli())

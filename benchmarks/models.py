"""The embedded models on the example requests, through the whole pipeline.

    python -m benchmarks models [--models smollm2-135m,qwen2.5-coder-0.5b] [--requests examples/requests/*.json]
                                [--target 10] [--per-call 5] [--chains 1] [--timeout 300] [--temperature 0.8]
                                [--json results.json] [--show-rejections 3] [--show-examples 3]

For each model it starts the embedded LLM (one at a time: the machine is shared), an embedded
stack pointed at it, and runs each request with a small target. Per run it prints:

- valid: valid, new examples (accepted or surplus) / items parsed
- copy: items equal to a formatting example of their call / items parsed
- dup: items repeating an earlier one (exact, near, semantic) / items parsed
- invalid: items of the wrong structure or label / items parsed
- unparse: fragments that did not parse / (items parsed + fragments)
- ex/min: examples accepted per minute of wall time; calls: LLM calls made

A run that reaches its timeout is cancelled and reported with what it had. Figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import logging
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datacreator import remote
from datacreator.bus.codec import PoisonMessage, decode
from datacreator.bus.readback import read_to_end
from datacreator.config import Settings
from datacreator.contracts import Rejection, RequestStatus
from datacreator.llm.embedded import MODELS, EmbeddedLLM
from datacreator.stack import EmbeddedStack, LLMTarget, endpoint_json

ROOT = Path(__file__).resolve().parents[1]
# Reasons that are not about one item: a failed call, or an answer dropped after the request ended.
NOT_ITEMS = {"unparseable", "llm_error", "request_closed"}
COPY = {"copy_of_reference"}
DUPLICATE = {"duplicate", "near_duplicate", "semantic_duplicate"}
VALID_NEW = {"surplus"}


@dataclass
class Run:
    model: str
    request: str
    state: str
    target: int
    accepted: int
    items: int
    unparseable: int
    rejected: dict[str, int]
    llm_calls: int
    failed_calls: int
    completion_tokens: int
    wall_s: float
    samples: list[dict] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)

    def share(self, reasons: set[str]) -> float:
        return sum(self.rejected.get(r, 0) for r in reasons) / self.items if self.items else 0.0

    @property
    def valid(self) -> float:
        return (self.accepted + sum(self.rejected.get(r, 0) for r in VALID_NEW)) / self.items if self.items else 0.0

    @property
    def invalid(self) -> float:
        return self.share(set(self.rejected) - NOT_ITEMS - COPY - DUPLICATE - VALID_NEW)

    @property
    def unparseable_share(self) -> float:
        total = self.items + self.unparseable
        return self.unparseable / total if total else 0.0

    @property
    def per_minute(self) -> float:
        return self.accepted / self.wall_s * 60 if self.wall_s else 0.0

    def row(self) -> dict:
        return {
            "model": self.model, "request": self.request, "state": self.state,
            "accepted": f"{self.accepted}/{self.target}", "valid": f"{self.valid:.0%}",
            "copy": f"{self.share(COPY):.0%}", "dup": f"{self.share(DUPLICATE):.0%}",
            "invalid": f"{self.invalid:.0%}", "unparse": f"{self.unparseable_share:.0%}",
            "ex/min": f"{self.per_minute:.1f}", "calls": str(self.llm_calls), "wall s": f"{self.wall_s:.0f}",
        }


def from_status(model: str, request: str, status: RequestStatus | None, target: int, wall_s: float) -> Run:
    rejected = dict(status.rejected) if status else {}
    accepted = status.accepted if status else 0
    items = accepted + sum(v for k, v in rejected.items() if k not in NOT_ITEMS)
    return Run(
        model=model, request=request, state=status.state.value if status else "NO_STATUS", target=target,
        accepted=accepted, items=items, unparseable=rejected.get("unparseable", 0), rejected=rejected,
        llm_calls=status.llm_calls if status else 0, failed_calls=status.failed_calls if status else 0,
        completion_tokens=status.completion_tokens if status else 0, wall_s=wall_s,
    )


async def rejection_samples(settings: Settings, request_id: str, limit: int) -> list[dict]:
    samples: list[dict] = []
    if limit <= 0:
        return samples
    async for record in read_to_end(settings, settings.topics.rejected):
        try:
            rejection = decode(Rejection, record.value)
        except PoisonMessage:
            continue
        if rejection.request_id == request_id and len(samples) < limit:
            samples.append({"reason": rejection.reason.value, "detail": rejection.detail[:200],
                            "item": rejection.item, "raw": (rejection.raw or "")[:300] or None})
    return samples


async def run_one(settings: Settings, model: str, path: str, args: argparse.Namespace) -> Run:
    name = Path(path).stem
    overrides = {"target_count": args.target, "examples_per_call": args.per_call, "chains": args.chains,
                 "request_id": f"bench-{name}-{uuid.uuid4().hex[:8]}"}
    request = remote.load_request(path, **overrides)
    if args.strategy:
        request = request.model_copy(update={"strategy": args.strategy})
    if args.temperature is not None:
        request = request.model_copy(update={"model": request.model.model_copy(update={"temperature": args.temperature})})
    started = time.monotonic()
    await remote.submit(settings, request)
    try:
        status = await remote.wait_for_final(settings, request.request_id, timeout_s=args.timeout)
    except TimeoutError:
        await remote.cancel(settings, request.request_id, "benchmark timeout")
        await asyncio.sleep(1.0)
        status = await remote.latest_status(settings, request.request_id)
    wall = time.monotonic() - started
    run = from_status(model, name, status, request.target_count, wall)
    run.samples = await rejection_samples(settings, request.request_id, args.show_rejections)
    if args.show_examples > 0:
        run.examples = [e.data for e in (await remote.collect_examples(settings, request.request_id))[: args.show_examples]]
    return run


async def bench_model(model: str, paths: list[str], args: argparse.Namespace) -> list[Run]:
    llm = EmbeddedLLM(model, n_ctx=args.n_ctx, n_threads=args.threads)
    started = time.monotonic()
    await llm.start(timeout_s=300)
    print(f"# {model}: server ready in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    stack = EmbeddedStack(Settings())
    runs: list[Run] = []
    try:
        target = LLMTarget(llm.base_url, llm.model_alias)
        # One completion at a time on the server: queueing more only makes calls time out.
        options = {"max_concurrency": 1, "read_timeout_s": args.timeout, "total_timeout_s": args.timeout, "max_attempts": 2}
        if args.structured_output:
            options["structured_output"] = args.structured_output
        settings = await stack.start(endpoints_json=endpoint_json(target, **options))
        for path in paths:
            run = await run_one(settings, model, path, args)
            runs.append(run)
            print(json.dumps(run.row()), file=sys.stderr, flush=True)
            for sample in run.samples:
                print("   ", json.dumps(sample, ensure_ascii=False)[:400], file=sys.stderr)
            for example in run.examples:
                print("    accepted:", json.dumps(example, ensure_ascii=False)[:400], file=sys.stderr)
    finally:
        await stack.stop()
        await llm.stop()
    return runs


def table(runs: list[Run]) -> str:
    rows = [r.row() for r in runs]
    if not rows:
        return ""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |",
             "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|"]
    lines += ["| " + " | ".join(r[c].ljust(widths[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def summary(runs: list[Run]) -> str:
    """One line per model: totals over its runs."""
    lines = ["| model | accepted | valid | copy | unparse | ex/min | calls | wall s |", "|---|---|---|---|---|---|---|---|"]
    by_model: dict[str, list[Run]] = {}
    for run in runs:
        by_model.setdefault(run.model, []).append(run)
    for model, group in by_model.items():
        items = sum(r.items for r in group)
        rejected: Counter[str] = Counter()
        for r in group:
            rejected.update(r.rejected)
        accepted = sum(r.accepted for r in group)
        unparse = sum(r.unparseable for r in group)
        wall = sum(r.wall_s for r in group)
        valid = (accepted + sum(rejected[k] for k in VALID_NEW)) / items if items else 0.0
        copy = sum(rejected[k] for k in COPY) / items if items else 0.0
        lines.append(
            f"| {model} | {accepted}/{sum(r.target for r in group)} | {valid:.0%} | {copy:.0%} | "
            f"{unparse / (items + unparse) if items + unparse else 0:.0%} | {accepted / wall * 60 if wall else 0:.1f} | "
            f"{sum(r.llm_calls for r in group)} | {wall:.0f} |"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    paths = sorted(p for pattern in args.requests for p in glob.glob(pattern))
    if not paths:
        raise SystemExit(f"no request files match {args.requests}")
    runs: list[Run] = []
    for model in args.models.split(","):
        runs += await bench_model(model.strip(), paths, args)  # one model at a time: the machine is shared
    print(table(runs))
    print()
    print(summary(runs))
    if args.json:
        Path(args.json).write_text(json.dumps([{**asdict(r), "row": r.row()} for r in runs], indent=2))
    if args.results:
        from benchmarks.common import machine
        from benchmarks.results import write_results

        write_results(args.results, {"embedded_examples_per_min": examples_per_minute(runs)}, ["models"],
                      {"models": [r.row() for r in runs]}, machine())


def examples_per_minute(runs: list[Run]) -> float | None:
    """Examples accepted per minute of wall time over the runs of the first model asked for."""
    first = [r for r in runs if runs and r.model == runs[0].model]
    wall = sum(r.wall_s for r in first)
    return sum(r.accepted for r in first) / wall * 60 if wall else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--requests", nargs="+", default=[str(ROOT / "examples" / "requests" / "*.json")])
    parser.add_argument("--target", type=int, default=10)
    parser.add_argument("--per-call", type=int, default=5)
    parser.add_argument("--chains", type=int, default=1)
    parser.add_argument("--strategy", choices=["none", "random", "contrastive", "similar", "tree"])
    parser.add_argument("--temperature", type=float, help="the request's temperature (default: the request's own)")
    parser.add_argument("--structured-output", choices=["json_schema", "json_object", "none"])
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: every core but one)")
    parser.add_argument("--show-rejections", type=int, default=0, help="print this many rejections of each run")
    parser.add_argument("--show-examples", type=int, default=0, help="print this many accepted examples of each run")
    parser.add_argument("--json", help="write every run, with its rejection counts, to this file")
    parser.add_argument("--results", help="write results.json (stable keys, benchmarks/results.py) to this file")
    return parser.parse_args(argv)



def cli() -> int:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    asyncio.run(main(parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

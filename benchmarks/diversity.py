"""Diversity of what each self-reference strategy makes, side by side, on one endpoint.

    python -m benchmarks diversity [--llm simulator|embedded|URL] [--model NAME] [--target 60]
                                   [--per-call 5] [--chains 4] [--strategies none,random,...]
                                   [--out docs/diversity.md]

One request per strategy, run in turn through the embedded stack (broker, planner, generator,
curator). For each it reports:
- distinct-2: distinct word bigrams / all word bigrams over the request's examples;
- mean pairwise embedding distance: 1 - cosine of all-MiniLM-L6-v2 sentence embeddings;
- label balance: entropy of the label distribution over log(size of the label space) (1 = even),
  and the largest label share over the smallest (labels never made count as share 0);
- accepted/call: accepted examples per LLM call, and the final state and wall time.

The simulator writes random words, so its table is a plumbing check only: it says nothing about
the diversity of a real model. Real figures need a model (`--llm embedded` or an endpoint URL).
Figures only: nothing here asserts a value.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import SEED_EXAMPLE as SEED
from datacreator import remote
from datacreator.config import Settings
from datacreator.contracts import CreationRequest, ModelSpec, RequestStatus, Strategy
from datacreator.logic.embeddings import example_text
from datacreator.logic.planning import resolve_label
from datacreator.logic.shape import get_path
from datacreator.minilm import shared_embedder
from datacreator.report import distinct_n, mean_cosine_distance
from datacreator.stack import EmbeddedStack, endpoint_json, start_llm, stop_llm

INSTRUCTION = (
    "Create commonsense multiple-choice questions about everyday situations. Each question has "
    "four options A to D and exactly one correct answer; vary the topic and the correct letter."
)
_MISSING = object()


@dataclass
class Row:
    strategy: str
    state: str
    examples: int
    calls: int
    distinct_2: float
    mean_distance: float
    label_entropy: float
    label_max_min: float
    seconds: float

    @property
    def per_call(self) -> float:
        return self.examples / self.calls if self.calls else 0.0


def label_balance(labels: list[Any], space: list[Any] | None) -> tuple[float, float]:
    """(normalised entropy, largest share / smallest share) of the labels over the label space."""
    counts = Counter(repr(label) for label in labels)
    keys = [repr(v) for v in space] if space else list(counts)
    if not labels or len(keys) < 2:
        return 0.0, math.inf
    shares = [counts.get(key, 0) / len(labels) for key in keys]
    entropy = -sum(p * math.log(p) for p in shares if p > 0) / math.log(len(keys))
    smallest = min(shares)
    return entropy, (max(shares) / smallest if smallest > 0 else math.inf)


def measure(strategy: str, state: str, examples: list[dict[str, Any]], calls: int, seconds: float, request: CreationRequest) -> Row:
    texts = [example_text(data) for data in examples]
    vectors = shared_embedder().embed(texts) if texts else np.zeros((0, 384), dtype=np.float32)
    field, space = resolve_label(request)
    labels: list[Any] = []
    if field is not None:
        for data in examples:
            value = get_path(data, field, _MISSING)
            if value is not _MISSING:
                labels += value if isinstance(value, list) else [value]
    entropy, max_min = label_balance(labels, space)
    return Row(strategy, state, len(examples), calls, distinct_n(texts, 2), mean_cosine_distance(vectors), entropy, max_min, seconds)


def table(rows: list[Row], title: str) -> str:
    lines = [
        title,
        "",
        "| strategy | state | examples | LLM calls | accepted/call | distinct-2 | mean embedding distance | label entropy | label max/min | seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = "inf" if math.isinf(r.label_max_min) else f"{r.label_max_min:.2f}"
        lines.append(
            f"| {r.strategy} | {r.state} | {r.examples} | {r.calls} | {r.per_call:.2f} | {r.distinct_2:.3f} | "
            f"{r.mean_distance:.3f} | {r.label_entropy:.3f} | {ratio} | {r.seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _progress(strategy: Strategy) -> Callable[[RequestStatus], None]:
    last = [-1]

    def show(status: RequestStatus) -> None:
        if status.llm_calls != last[0]:
            last[0] = status.llm_calls
            print(f"  {strategy.value}: {status.accepted}/{status.target_count} after {status.llm_calls} calls", file=sys.stderr)

    return show


async def run(args: argparse.Namespace) -> str:
    strategies = [Strategy(s.strip()) for s in args.strategies.split(",") if s.strip()]
    target = await start_llm(args.llm, args.model)
    stack = EmbeddedStack(Settings())
    rows: list[Row] = []
    try:
        options: dict[str, Any] = {"max_concurrency": args.chains}
        if args.llm == "embedded":
            options.update(read_timeout_s=600.0, total_timeout_s=900.0)
        settings = await stack.start(endpoints_json=endpoint_json(target, **options), stall_calls=args.stall_calls)
        for strategy in strategies:
            request = CreationRequest(
                instruction=INSTRUCTION, formatting_example=SEED, target_count=args.target,
                examples_per_call=args.per_call, chains=args.chains, strategy=strategy,
                tree_branching=args.branching, model=ModelSpec(temperature=args.temperature),
            )
            started = time.monotonic()
            await remote.submit(settings, request)
            try:
                final = await remote.wait_for_final(settings, request.request_id, _progress(strategy), args.timeout)
                state = final.state.value
            except TimeoutError:
                # Too slow for the time given: stop it and measure what it made so far.
                await remote.cancel(settings, request.request_id, reason="benchmark timeout")
                final = await remote.wait_for_final(settings, request.request_id, timeout_s=120)
                state = f"TIMEOUT after {args.timeout:.0f} s"
            seconds = time.monotonic() - started
            examples = await remote.collect_examples(settings, request.request_id)
            rows.append(measure(strategy.value, state, [e.data for e in examples], final.llm_calls, seconds, request))
            print(f"{strategy.value}: {final.state.value}, {len(examples)} examples, {final.llm_calls} calls, "
                  f"{seconds:.1f} s" + (f" ({final.error})" if final.error else ""), file=sys.stderr)
    finally:
        await stack.stop()
        await stop_llm(target)
    if args.llm == "simulator":
        title = ("### Simulator (plumbing check only: its text is random words, so these figures say nothing "
                 "about a real model's diversity)")
    else:
        title = f"### {args.llm}" + (f" {args.model}" if args.model else "") + f" ({target.model})"
    title += (f"\n\nOne request per strategy: target {args.target}, {args.per_call} examples per call, "
              f"{args.chains} chains, temperature {args.temperature}, tree branching {args.branching}.")
    return table(rows, title)


_CALLS = re.compile(r"llm calls\s+(\d+)")


def measure_files(specs: list[str]) -> str:
    """The same table from rows made before (`STRATEGY=FILE.jsonl`, e.g. the usefulness runs), read
    with the `.request.json` and `.meta.json` written beside them: no LLM, rerun at will."""
    rows: list[Row] = []
    requests: list[CreationRequest] = []
    for spec in specs:
        strategy, _, name = spec.partition("=")
        path = Path(name)
        request = CreationRequest.model_validate_json(path.with_suffix(".request.json").read_text())
        meta = json.loads(path.with_suffix(".meta.json").read_text())
        calls = next((int(m.group(1)) for line in meta.get("summary", []) if (m := _CALLS.search(line))), 0)
        data = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        state = "COMPLETED" if meta.get("complete") else f"partial ({len(data)} of {request.target_count})"
        rows.append(measure(strategy, state, data, calls, float(meta.get("wall_s", 0.0)), request))
        requests.append(request)
    first = requests[0]
    title = (f"### From committed rows: {len(rows)} requests of {first.target_count} (`--rows`)\n\n"
             + "\n".join(f"- {spec.split('=', 1)[0]}: `{spec.split('=', 1)[1]}`" for spec in specs))
    return table(rows, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", default="simulator", help="simulator, embedded or an OpenAI-compatible base URL")
    parser.add_argument("--model", default=None, help="embedded model name (see `datacreator.llm.embedded.MODELS`) or the endpoint's model")
    parser.add_argument("--target", type=int, default=60, help="examples per strategy")
    parser.add_argument("--per-call", type=int, default=5)
    parser.add_argument("--chains", type=int, default=4, help="keep it at 1-2 for the embedded server (one call at a time)")
    parser.add_argument("--branching", type=int, default=3, help="tree strategy: children kept per node")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--strategies", default=",".join(s.value for s in Strategy))
    parser.add_argument("--stall-calls", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    parser.add_argument("--out", default=None, help="also append the table to this markdown file")
    parser.add_argument("--rows", action="append", metavar="STRATEGY=FILE",
                        help="measure rows made before (with FILE's .request.json and .meta.json) instead of running requests")
    args = parser.parse_args(argv)
    text = measure_files(args.rows) if args.rows else asyncio.run(run(args))
    print(text)
    if args.out:
        with open(args.out, "a") as out:
            out.write("\n" + text)
    return 0



def cli() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(cli())

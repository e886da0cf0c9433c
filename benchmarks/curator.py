"""Curator throughput on one core: parse + validate + exact + MinHash dedup over a synthetic stream.

    python -m benchmarks curator [--n 100000] [--per-call 5] [--seed 7]

The stream is multiple-choice answers in the shapes models return (bare lists, fenced blocks with
prose, wrapper objects), with ~10% exact duplicates (re-cased / re-spaced), ~5% near duplicates (half re-punctuated,
half one word longer),
~3% wrong labels, ~2% wrong structure and ~2% broken JSON items. It prints examples/s for each
stage, the share of each outcome, and the memory the dedup state holds per 100k examples (the
DedupIndex's part, and the accepted ids RequestCuration keeps).
Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import sys
import time
import tracemalloc
from collections import Counter

from benchmarks import common
from datacreator.contracts import Candidate, GenerationTask
from datacreator.logic.curation import RequestCuration
from datacreator.logic.parsing import parse_examples
from datacreator.logic.validation import ExampleValidator

SEED_EXAMPLE = {
    "question": "Which planet in our solar system is the largest?",
    "options": {"A": "Mars", "B": "Jupiter", "C": "Venus", "D": "Earth"},
    "answer": "B",
}


def _vocabulary(rng: random.Random, size: int = 20_000) -> list[str]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    return ["".join(rng.choices(letters, weights, k=rng.randint(2, 10))) for _ in range(size)]


def make_stream(n: int, per_call: int, seed: int) -> tuple[list[list[object]], Counter]:
    """Items grouped by call, and how many of each kind were planted."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    planted: Counter = Counter()
    made: list[dict] = []
    items: list[object] = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.10 and made:
            source = rng.choice(made)
            item = {"question": "  " + source["question"].upper() + " ", "options": dict(source["options"]), "answer": source["answer"]}
            planted["exact_dup"] += 1
        elif roll < 0.15 and made:
            source = rng.choice(made)
            if rng.random() < 0.5:  # re-punctuated: the same words
                item = {**source, "question": source["question"].replace(" ", ", ", 2).rstrip("?") + "!"}
                planted["near_dup_punctuation"] += 1
            else:  # one word more: Jaccard of 3-shingles ~0.85 here, right at the threshold
                item = {**source, "question": source["question"] + " " + rng.choice(vocab)}
                planted["near_dup_one_word"] += 1
        elif roll < 0.18:
            item = _fresh(rng, vocab)
            item["answer"] = "E"
            planted["wrong_label"] += 1
        elif roll < 0.20:
            item = _fresh(rng, vocab)
            del item["options"]["D"]
            planted["wrong_structure"] += 1
        elif roll < 0.22:
            item = "BROKEN"
            planted["broken_json"] += 1
        else:
            item = _fresh(rng, vocab)
            made.append(item)
            planted["fresh"] += 1
        items.append(item)
    calls = [items[i:i + per_call] for i in range(0, n, per_call)]
    return calls, planted


def _fresh(rng: random.Random, vocab: list[str]) -> dict:
    question = " ".join(rng.choices(vocab, k=rng.randint(12, 28))) + "?"
    options = {key: " ".join(rng.choices(vocab, k=rng.randint(1, 4))) for key in "ABCD"}
    return {"question": question, "options": options, "answer": rng.choice("ABCD")}


def render(call: list[object], rng: random.Random) -> str:
    """One model answer holding the call's items, in one of the shapes models produce."""
    parts = ['{"question": "broken" "options": {}, "answer": "A"}' if item == "BROKEN" else json.dumps(item) for item in call]
    body = "[" + ", ".join(parts) + "]"
    shape = rng.random()
    if shape < 0.4:
        return body
    if shape < 0.8:
        return f"Here are {len(call)} new examples:\n```json\n{body}\n```\nLet me know if you need more."
    return '{"examples": ' + body + "}"


def make_task(task_id: str, target: int) -> GenerationTask:
    return common.make_task(task_id, SEED_EXAMPLE, instruction="quiz", target_count=target)


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="examples in the stream")
    parser.add_argument("--per-call", type=int, default=5, help="examples per model answer")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--num-perm", type=int, default=64)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    calls, planted = make_stream(args.n, args.per_call, args.seed)
    raws = [render(call, rng) for call in calls]
    base = make_task("bench-0", target=args.n)
    candidates = [
        Candidate(task=base.model_copy(update={"task_id": f"bench-{i}"}), endpoint="bench", model="bench", raw_output=raw)
        for i, raw in enumerate(raws)
    ]
    n = args.n
    print(f"stream: {n:,} examples in {len(raws):,} answers; planted {dict(planted)}")

    # Stage 1: parse + validate.
    validator = ExampleValidator.from_schema(base.example_schema, base.label_field, base.label_space)
    keys = validator.top_level_keys
    start = time.perf_counter()
    for raw in raws:
        for item in parse_examples(raw, keys).items:
            validator.validate(item)
    parse_validate = time.perf_counter() - start

    # Stage 2: + normalise + exact dedup (the curation without near dedup).
    exact = RequestCuration(base, near_threshold=None, num_perm=args.num_perm)
    gc.collect()
    start = time.perf_counter()
    for cand in candidates:
        exact.curate(cand)
    exact_only = time.perf_counter() - start

    # Stage 3: the full curation (parse + validate + exact + MinHash LSH + messages).
    gc.collect()
    rss_before = rss_mib()
    full = RequestCuration(base, near_threshold=0.85, num_perm=args.num_perm)
    outcomes: Counter = Counter()
    published = []
    start = time.perf_counter()
    for cand in candidates:
        result = full.curate(cand)
        published += result.examples
        outcomes["accepted"] += len(result.examples)
        outcomes.update(result.outcome.rejected)
    full_time = time.perf_counter() - start
    rss_after = rss_mib()

    def rate(seconds: float) -> str:
        return f"{n / seconds:>10,.0f} examples/s  ({seconds * 1e6 / n:6.1f} us/example)"

    print(f"parse + validate:                       {rate(parse_validate)}")
    print(f"curate, exact dedup only:               {rate(exact_only)}")
    print(f"curate, exact + MinHash LSH (full):     {rate(full_time)}")
    print(f"ratio: parse+validate / full = {full_time / parse_validate:.2f}x slower with curation+MinHash; "
          f"exact-only / full = {full_time / exact_only:.2f}x")
    total = sum(outcomes.values())
    print("outcomes (share of items):")
    for name, count in outcomes.most_common():
        print(f"  {name:<20} {count:>8,}  {count / total:6.1%}")

    # Memory held by the request's state, rebuilt from the published examples under tracemalloc.
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    probe = RequestCuration(base, near_threshold=0.85, num_perm=args.num_perm)
    for offset in range(0, len(published), 500):
        probe.restore_many(published[offset:offset + 500])
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    by_file = {os.path.basename(stat.traceback[0].filename): stat.size for stat in tracemalloc.take_snapshot().statistics("filename")}
    tracemalloc.stop()
    entries = max(1, probe.state_size())
    per_entry = held / entries
    index, ids = by_file.get("dedup.py", 0) / entries, by_file.get("curation.py", 0) / entries
    print(f"dedup state: {probe.state_size():,} entries, {held / 2**20:.1f} MiB traced = {per_entry:,.0f} bytes/entry "
          f"(DedupIndex {index:,.0f}, accepted ids {ids:,.0f}, other {per_entry - index - ids:,.0f}) "
          f"= {per_entry * 100_000 / 2**20:.1f} MiB per 100k examples (RSS delta of the full run: "
          f"{rss_after - rss_before:+.1f} MiB, which also holds the {len(published):,} Example messages)")


def cli() -> int:
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())

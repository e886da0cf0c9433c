"""Curator restore after a rebalance: rebuilding the dedup state from the examples topic.

    python -m benchmarks restore [--n 100000] [--requests 4]

N examples of R requests, as records of the examples topic (3 partitions), are handed to a
curator taking the partitions over, in memory (the broker's read speed is not measured here).
It times (wall clock, and the process's CPU time: the machine may be shared) `on_assigned` (decode and restore) and the first candidate of each request (which builds
the request's dedup index from what was restored, when that is left to it), and reports the
longest time the event loop was blocked meanwhile (heartbeats and commits wait that long); then a
rebalance that gives the same partitions back to the member. Figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from datacreator.bus import readback
from datacreator.bus.codec import encode
from datacreator.bus.runtime import Delivery
from datacreator.config import Settings
from datacreator.contracts import Candidate, Example, GenerationTask, ModelSpec, Reference, Strategy
from datacreator.handlers import curator as curator_module
from datacreator.logic.dedup import example_id
from datacreator.logic.shape import example_schema

SEED = {"question": "Which planet in our solar system is the largest?",
        "options": {"A": "Mars", "B": "Jupiter", "C": "Venus", "D": "Earth"}, "answer": "B"}


def _item(rng: random.Random, words: list[str]) -> dict:
    return {"question": " ".join(rng.choices(words, k=14)) + "?",
            "options": {k: " ".join(rng.choices(words, k=3)) for k in "ABCD"}, "answer": rng.choice("ABCD")}


class _LoopWatch:
    """The longest gap between two wake-ups of a task that asks to run every 5 ms."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - 0.005)
            last = now

    async def __aenter__(self) -> _LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.sleep(0.01)  # running before what it watches starts
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(0.01)  # a last wake-up after what it watched
        assert self._task is not None
        self._task.cancel()


class _Record:
    __slots__ = ("topic", "partition", "offset", "key", "value")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes, value: bytes) -> None:
        self.topic, self.partition, self.offset, self.key, self.value = topic, partition, offset, key, value


def _records(settings: Settings, n: int, requests: int, seed: int) -> dict[int, list[_Record]]:
    """The examples topic as the broker would hand it out: N examples of R requests, 3 partitions."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("etaoinshrdlcumwfgypb", k=rng.randint(2, 9))) for _ in range(5000)]
    by_partition: dict[int, list[_Record]] = {p: [] for p in range(settings.kafka.topic_partitions)}
    for i in range(n):
        rid = f"restore-{i % requests}"
        data = _item(rng, words)
        example = Example(example_id=example_id(rid, data), request_id=rid, data=data, strategy=Strategy.random,
                          reference_ids=[None], task_id=f"{rid}-t{i // 5}", chain=0, step=i // 5, model="m")
        partition = (i % requests) % settings.kafka.topic_partitions
        records = by_partition[partition]
        records.append(_Record(settings.topics.examples, partition, len(records), rid.encode(), encode(example)))
    return by_partition


async def run(n: int, requests: int, seed: int) -> dict[str, float]:
    settings = Settings(topic_partitions=3)
    by_partition = _records(settings, n, requests, seed)
    ends = {p: len(r) for p, r in by_partition.items()}

    async def read_to_end(s: Settings, topic: str, partitions=None):  # type: ignore[no-untyped-def]
        for p in sorted(partitions if partitions is not None else by_partition):
            for record in by_partition[p]:
                yield record

    async def end_offsets(s: Settings, topic: str, partitions, timeout_s: float = 5.0):  # type: ignore[no-untyped-def]
        return {p: ends[p] for p in partitions}

    # The broker is left out: reading 20,000 examples back from the embedded broker (Tansu, memory
    # storage) took minutes and stalled, which would hide the curator's own cost.
    for module in (readback, curator_module):
        for name, replacement in (("read_to_end", read_to_end), ("end_offsets", end_offsets)):
            if hasattr(module, name):
                setattr(module, name, replacement)

    curator = curator_module.CuratorHandler(settings)
    curator.status.latest = {}
    schema = example_schema(SEED, "answer", ["A", "B", "C", "D"], False)
    rng = random.Random(seed + 1)
    words = ["".join(rng.choices("etaoinshrdlcumwfgypb", k=rng.randint(2, 9))) for _ in range(5000)]
    rids = [f"restore-{i}" for i in range(requests)]
    async with _LoopWatch() as watch:
        started, cpu = time.perf_counter(), time.process_time()
        await curator.on_assigned({0, 1, 2})
        assigned, assigned_cpu = time.perf_counter() - started, time.process_time() - cpu
        started, cpu = time.perf_counter(), time.process_time()
        for rid in rids:
            task = GenerationTask(task_id=f"{rid}-new", request_id=rid, chain=0, step=0, strategy=Strategy.random,
                                  instruction="x", references=[Reference(data=SEED)], num_examples=1,
                                  target_count=10 * n, example_schema=schema, label_field="answer",
                                  label_space=["A", "B", "C", "D"], model=ModelSpec())
            answer = Candidate(task=task, endpoint="default", model="m", raw_output="[" + json.dumps(_item(rng, words)) + "]")
            partition = (int(rid.rsplit("-", 1)[1])) % settings.kafka.topic_partitions
            await curator.handle(answer, Delivery(settings.topics.candidates, partition, 0, rid))
        first, first_cpu = time.perf_counter() - started, time.process_time() - cpu
    restored = sum(c.accepted_count for c in curator.state.requests.values())
    # A rebalance that gives every partition back to this member.
    async with _LoopWatch() as again_watch:
        started = time.perf_counter()
        await curator.on_revoked({0, 1, 2})
        await curator.on_assigned({0, 1, 2})
        again = time.perf_counter() - started
    kept = sum(c.accepted_count for c in curator.state.requests.values())
    return {"examples": n, "restored": restored, "on_assigned_s": assigned, "first_candidates_s": first,
            "total_s": assigned + first, "cpu_s": assigned_cpu + first_cpu, "longest_loop_block_s": watch.longest,
            "rebalance_back_s": again, "rebalance_back_loop_block_s": again_watch.longest, "kept_after_rebalance": kept}


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks restore", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.n, args.requests, args.seed))
    for key, value in result.items():
        print(f"{key:28} {value:.3f}" if isinstance(value, float) else f"{key:28} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())

"""The sink service: rolling JSONL shards that hold each example once, across crashes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from datacreator.bus.codec import encode
from datacreator.bus.runtime import Delivery, ServiceRunner
from datacreator.config import Settings
from datacreator.contracts import Example
from datacreator.handlers.sink import SinkHandler, request_dir_name
from tests.test_consumer import make_example, publish

pytestmark = pytest.mark.timeout(90)


def rows_in(directory: Path) -> list[dict]:
    rows = []
    for path in sorted(directory.glob("*/part-*.jsonl")):
        rows.extend(orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip())
    return rows


def record(example: Example, partition: int = 0, offset: int = 0) -> tuple[Example, Delivery]:
    return example, Delivery("examples", partition, offset, example.request_id, encode(example))


async def test_shards_roll_and_duplicates_are_dropped(bus_settings, tmp_path):
    handler = SinkHandler(bus_settings, directory=tmp_path, shard_rows=4)
    await handler.on_assigned({0})
    examples = [make_example("req-1", n) for n in range(10)]
    for offset, example in enumerate(examples + examples[:3]):
        await handler.handle(*record(example, offset=offset))
    await handler.stop()
    files = sorted(p.name for p in (tmp_path / "req-1").iterdir())
    assert files == ["part-0-00000.jsonl", "part-0-00001.jsonl", "part-0-00002.jsonl"]
    assert [len((tmp_path / "req-1" / f).read_bytes().splitlines()) for f in files] == [4, 4, 2]
    assert [r["example_id"] for r in rows_in(tmp_path)] == [e.example_id for e in examples]
    assert (handler.written, handler.duplicates) == (10, 3)


async def test_restart_repairs_a_torn_line_and_remembers_ids(bus_settings, tmp_path):
    first = SinkHandler(bus_settings, directory=tmp_path, shard_rows=3)
    await first.on_assigned({1})
    examples = [make_example("req-2", n) for n in range(7)]
    for offset, example in enumerate(examples[:5]):
        await first.handle(*record(example, 1, offset))
    await first.stop()
    last = tmp_path / "req-2" / "part-1-00001.jsonl"
    with open(last, "ab") as out:  # a write cut short by a crash
        out.write(orjson.dumps(examples[5].model_dump(mode="json"))[:40])

    second = SinkHandler(bus_settings, directory=tmp_path, shard_rows=3)
    await second.on_assigned({1})
    for offset, example in enumerate(examples):  # everything from the last commit, again
        await second.handle(*record(example, 1, offset))
    await second.stop()
    ids = [r["example_id"] for r in rows_in(tmp_path)]
    assert sorted(ids) == sorted(e.example_id for e in examples) and len(ids) == 7
    assert (second.written, second.duplicates) == (2, 5)
    assert sorted(p.name for p in (tmp_path / "req-2").iterdir()) == ["part-1-00000.jsonl", "part-1-00001.jsonl", "part-1-00002.jsonl"]


def test_request_directory_names_are_safe():
    assert request_dir_name("abc-1.2:x") == "abc-1.2:x"
    for bad in ("../etc", "a/b", "..", ""):
        name = request_dir_name(bad)
        assert "/" not in name and name not in (".", "..") and name.startswith("_")


def _sink_env(settings, directory: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DATACREATOR_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "DATACREATOR_TOPIC_PARTITIONS": str(settings.kafka.topic_partitions),
        "DATACREATOR_SINK_DIR": str(directory),
        "DATACREATOR_SINK_SHARD_ROWS": "25",
        "DATACREATOR_HTTP_PORT": "0",
        "DATACREATOR_LOG_LEVEL": "WARNING",
        # Tansu's group joins take time in proportion to the session timeout: keep it short.
        "DATACREATOR_KAFKA_SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "DATACREATOR_KAFKA_HEARTBEAT_INTERVAL_MS": str(settings.kafka.heartbeat_interval_ms),
    })
    for field, topic in settings.topics.model_dump().items():
        env[f"DATACREATOR_TOPICS__{field.upper()}"] = topic
    return env


async def _wait_rows(directory: Path, at_least: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    count = 0
    while time.monotonic() < deadline:
        # Complete lines only: a torn line is there until the sink repairs it.
        count = sum(p.read_bytes().count(b"\n") for p in directory.glob("*/part-*.jsonl"))
        if count >= at_least:
            return count
        await asyncio.sleep(0.05)
    return count


@pytest.mark.slow
async def test_sigkill_mid_stream_then_restart_loses_and_repeats_nothing(bus_settings, tmp_path):
    bus_settings = bus_settings.with_updates(kafka_session_timeout_ms=3000, kafka_heartbeat_interval_ms=500)
    sink_dir = tmp_path / "sink"
    topic = bus_settings.topics.examples
    requests = {rid: [make_example(rid, n) for n in range(150)] for rid in ("req-k1", "req-k2", "req-k3")}
    first_half = [(rid, e) for rid, items in requests.items() for e in items[:100]]
    await publish(bus_settings, topic, first_half + first_half[:40])  # with redeliveries

    proc = subprocess.Popen(
        [sys.executable, "-m", "datacreator.cli", "serve", "sink"], env=_sink_env(bus_settings, sink_dir),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        written = await _wait_rows(sink_dir, 60, timeout_s=40)
        assert written >= 60, f"the sink wrote {written} rows; stderr: {proc.stderr.read(2000) if proc.poll() is not None else ''}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no clean stop: no final commit, no leave
        proc.wait(timeout=10)
    at_kill = len(rows_in(sink_dir))
    # A write torn by the crash, at the end of one of the shards.
    torn_file = sorted(sink_dir.glob("*/part-*.jsonl"))[-1]
    with open(torn_file, "ab") as out:
        out.write(b'{"schema_version": 1, "example_id": "tor')

    second_half = [(rid, e) for rid, items in requests.items() for e in items[100:]]
    await publish(bus_settings, topic, second_half + first_half[::7])

    # Directory and shard size from the environment, as in production.
    os.environ["DATACREATOR_SINK_DIR"] = str(sink_dir)
    os.environ["DATACREATOR_SINK_SHARD_ROWS"] = "25"
    try:
        settings = Settings(**bus_settings.model_dump(exclude={"sink": {"dir", "shard_rows"}}))
        handler = SinkHandler(settings)
    finally:
        del os.environ["DATACREATOR_SINK_DIR"], os.environ["DATACREATOR_SINK_SHARD_ROWS"]
    assert handler.directory == sink_dir and handler.shard_rows == 25
    runner = ServiceRunner(bus_settings, handler)  # same group as the killed process: resumes from its commits
    task = asyncio.create_task(runner.run())
    try:
        total = await _wait_rows(sink_dir, 450, timeout_s=60)
        await asyncio.sleep(1.0)  # anything still arriving would be a duplicate
    finally:
        runner.request_stop()
        await asyncio.wait_for(task, 30)
    rows = rows_in(sink_dir)
    ids = [r["example_id"] for r in rows]
    expected = {e.example_id for items in requests.values() for e in items}
    assert total >= 450 and at_kill < 450
    assert len(ids) == len(set(ids)), "a row was written twice"
    assert set(ids) == expected
    for rid, items in requests.items():
        shards = sorted((sink_dir / rid).glob("part-*.jsonl"))
        assert {orjson.loads(line)["request_id"] for s in shards for line in s.read_bytes().splitlines()} == {rid}
        assert all(len(s.read_bytes().splitlines()) <= 25 for s in shards)
        assert sum(len(s.read_bytes().splitlines()) for s in shards) == len(items)

"""Settings and requests shared by the fault tests."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from datacreator.bus.admin import ensure_topics
from datacreator.config import Settings
from datacreator.contracts import CreationRequest, Strategy
from datacreator.embedded.broker import EmbeddedBroker
from datacreator.stack import LLMTarget, endpoint_json
from tests.fixtures.broker import unique_topics
from tests.helpers import MCQ


async def fault_settings(broker: EmbeddedBroker, llm_base_url: str, partitions: int = 3, **endpoint: object) -> Settings:
    """Settings on `broker` with topics of the test's own (created) and the `default` endpoint on the simulator."""
    settings = Settings(
        kafka_bootstrap=broker.bootstrap,
        topics=unique_topics(),
        topic_partitions=partitions,
        kafka_client_overrides=EmbeddedBroker.client_overrides(),
        kafka_session_timeout_ms=2000,
        kafka_heartbeat_interval_ms=500,
        shutdown_timeout_s=10.0,
        status_interval_s=0.3,
        endpoints_json=endpoint_json(LLMTarget(llm_base_url, "datacreator-simulator"), max_concurrency=64, **endpoint),
    )
    await ensure_topics(settings)
    return settings


def mcq_request(target_count: int, **fields: object) -> CreationRequest:
    options: dict[str, object] = dict(examples_per_call=5, chains=4, strategy=Strategy.random)
    options.update(fields)
    return CreationRequest(
        instruction="Create commonsense multiple-choice questions with options A to D.",
        formatting_example=MCQ, target_count=target_count, **options,
    )


def sink_rows(directory: Path, request_dir: str) -> list[str]:
    """Example ids of the complete rows the sink wrote for one request (repeats kept)."""
    ids = []
    for path in sorted((directory / request_dir).glob("part-*.jsonl")):
        data = path.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            if line.strip():
                ids.append(orjson.loads(line)["example_id"])
    return ids


async def wait_until(predicate, timeout_s: float, interval_s: float = 0.1):  # type: ignore[no-untyped-def]
    import asyncio

    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval_s)

"""Every aiokafka client of the project is built here, so the options they share are set once.

A broker that needs different client settings (the embedded one does) says so through
`Settings.kafka.client_overrides`, applied last by these factories and nowhere else.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from datacreator.config import Settings


def _overrides(settings: Settings, kind: str) -> dict[str, Any]:
    return dict(settings.kafka.client_overrides.get(kind, {}))


def make_producer(settings: Settings, **options: Any) -> AIOKafkaProducer:
    # Idempotent producers need broker support that not every Kafka-protocol broker has;
    # deterministic ids downstream make plain acks=all enough.
    merged: dict[str, Any] = dict(
        acks="all",
        enable_idempotence=False,
        linger_ms=2,
        max_request_size=max(settings.kafka.max_message_bytes * 2, 1_048_576),
        request_timeout_ms=30_000,
    )
    merged.update(_overrides(settings, "producer"))
    merged.update(options)
    return AIOKafkaProducer(**settings.kafka_kwargs(), **merged)


def make_consumer(settings: Settings, group_id: str | None = None, **options: Any) -> AIOKafkaConsumer:
    """A consumer with manual commits; `group_id=None` reads assigned partitions outside any group."""
    merged: dict[str, Any] = dict(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=max(settings.kafka.max_message_bytes * 2, 1_048_576),
        # How long the broker may hold an empty fetch; Kafka answers as soon as records arrive.
        fetch_max_wait_ms=500,
    )
    merged.update(_overrides(settings, "consumer"))
    merged.update(options)
    return AIOKafkaConsumer(**settings.kafka_kwargs(), **merged)


async def refresh_metadata(consumer: AIOKafkaConsumer) -> None:
    """Ask the broker for the topic list again (a topic created after the consumer started).

    aiokafka has no public call for this: `partitions_for_topic` only reads the cached metadata,
    which is refreshed every `metadata_max_age_ms` (5 min). The private client is touched here only.
    """
    await consumer._client.force_metadata_update()

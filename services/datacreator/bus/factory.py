"""Every aiokafka client of the project is built here, so the options they share are set once.

A broker that needs different client settings (the embedded one does) says so through
`Settings.kafka.client_overrides`, applied last by these factories and nowhere else.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from datacreator.config import Settings

# How long a follower's fetch may wait (at least): a consumer whose records are not on any request's
# path (the status followers). The embedded broker answers a fetch only when its wait is over,
# polling its storage meanwhile, so each consumer costs broker and client CPU in proportion to
# fetches per second: three status followers at 25 ms made 111 of the 270 fetches per second of a
# stack at work (0.5 s calls, 32 at a time). Kafka answers as soon as records come, where a longer
# wait costs nothing.
FOLLOWER_FETCH_WAIT_MS = 200


def client_overrides(settings: Settings, kind: str) -> dict[str, Any]:
    """The broker's settings for one kind of client ("producer", "consumer"), or what it tells the bus ("broker")."""
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
    merged.update(client_overrides(settings, "producer"))
    merged.update(options)
    return AIOKafkaProducer(**settings.kafka_kwargs(), **merged)


def make_consumer(settings: Settings, group_id: str | None = None, *, follower: bool = False, **options: Any) -> AIOKafkaConsumer:
    """A consumer with manual commits; `group_id=None` reads assigned partitions outside any group.
    A `follower` may wait FOLLOWER_FETCH_WAIT_MS for its records."""
    merged: dict[str, Any] = dict(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=max(settings.kafka.max_message_bytes * 2, 1_048_576),
        # How long the broker may hold an empty fetch; Kafka answers as soon as records arrive.
        fetch_max_wait_ms=500,
    )
    merged.update(client_overrides(settings, "consumer"))
    if follower:
        merged["fetch_max_wait_ms"] = max(merged["fetch_max_wait_ms"], FOLLOWER_FETCH_WAIT_MS)
    merged.update(options)
    return AIOKafkaConsumer(**settings.kafka_kwargs(), **merged)


async def refresh_metadata(consumer: AIOKafkaConsumer) -> None:
    """Ask the broker for the topic list again (a topic created after the consumer started).

    aiokafka has no public call for this: `partitions_for_topic` only reads the cached metadata,
    which is refreshed every `metadata_max_age_ms` (5 min). The private client is touched here only.
    """
    await consumer._client.force_metadata_update()

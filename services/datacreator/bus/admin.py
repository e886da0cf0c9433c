"""Topic administration: wait for the broker, create the topics the services use."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, for_code

from datacreator.config import Settings

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


class TopicMismatch(RuntimeError):
    """Existing topics whose partition count is not the configured one: the services refuse to run.

    Every topic is keyed by request id and the range assignor hands out the same partition
    numbers of each input to one member, so a topic with another count sends a request's
    messages to a member that does not hold it (Kafka auto-creates a topic with its default of
    one partition when a client names it first). Not retried: only an operator can fix it.
    """
# Errors meaning "the broker does not take these topic configs": create without them.
_CONFIG_REFUSED = {
    35,  # UNSUPPORTED_VERSION
    40,  # INVALID_CONFIG
    42,  # INVALID_REQUEST
    44,  # POLICY_VIOLATION
}
COMPACT = {"cleanup.policy": "compact"}


def _admin(settings: Settings, request_timeout_ms: int = 5000) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**settings.kafka_kwargs(), request_timeout_ms=request_timeout_ms)


async def wait_for_broker(settings: Settings, timeout_s: float = 30.0) -> None:
    """Return once a metadata request succeeds; TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        admin = _admin(settings, request_timeout_ms=2000)
        try:
            await asyncio.wait_for(_metadata(admin), timeout=max(0.5, deadline - time.monotonic()))
            return
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"Kafka at {settings.kafka.bootstrap} did not answer within {timeout_s}s ({type(last).__name__})"
            )
        await asyncio.sleep(0.2)


async def probe(bootstrap: str, request_timeout_ms: int = 2000) -> None:
    """One metadata request to a broker known only by its address (one being started, or checked
    before anything else uses it); raises if it does not answer."""
    await _metadata(AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms))


async def _metadata(admin: AIOKafkaAdminClient) -> list[str]:
    try:
        await admin.start()
        return list(await admin.list_topics())
    finally:
        await admin.close()


async def ensure_topics(
    settings: Settings,
    topics: list[str] | None = None,
    partitions: int | None = None,
    *,
    timeout_s: float = 30.0,
) -> None:
    """Create every missing topic (default: all of `settings.topics`). Idempotent.

    An existing topic with another partition count than `partitions` raises TopicMismatch,
    naming every such topic and its count.

    The status and planner-state topics are created with `cleanup.policy=compact`; a broker
    that refuses topic configs gets them without. Retries while the broker is coming up.
    """
    names = list(dict.fromkeys(topics if topics is not None else settings.topics.all()))
    count = partitions or settings.kafka.topic_partitions
    compacted = settings.topics.compacted()
    deadline = time.monotonic() + timeout_s
    await wait_for_broker(settings, timeout_s)
    while True:
        try:
            await asyncio.wait_for(
                _create_missing(settings, names, count, compacted), timeout=max(1.0, deadline - time.monotonic())
            )
            return
        except TopicMismatch:
            raise
        except (TimeoutError, KafkaError, OSError) as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"could not create topics on {settings.kafka.bootstrap}: {exc!r}") from exc
            log.info("topic creation not done yet (%s), retrying", type(exc).__name__)
            await asyncio.sleep(0.5)


async def _create_missing(settings: Settings, names: list[str], partitions: int, compacted: set[str]) -> None:
    admin = _admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            replication = settings.kafka.topic_replication_factor
            retry_plain = await _create(
                admin, [_new_topic(n, partitions, replication, COMPACT if n in compacted else None) for n in missing]
            )
            if retry_plain:
                log.warning("broker refused topic configs for %s; creating them without", sorted(retry_plain))
                left = await _create(admin, [_new_topic(n, partitions, replication, None) for n in retry_plain])
                if left:
                    raise for_code(next(iter(left.values())))(f"creating topics {sorted(left)}")
        await _check_partitions(admin, [n for n in names if n in existing], partitions)
        await _warn_if_not_compacted(admin, [n for n in names if n in compacted and n in existing])
    finally:
        await admin.close()


async def _check_partitions(admin: AIOKafkaAdminClient, names: list[str], partitions: int) -> None:
    # Only topics listed as existing are described: a metadata request naming a missing topic
    # makes a broker with auto-creation create it, with its default count.
    if not names:
        return
    counts = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(names) if t["error_code"] == 0}
    wrong = {n: c for n, c in counts.items() if c != partitions}
    if wrong:
        found = ", ".join(f"{n} has {c}" for n, c in sorted(wrong.items()))
        raise TopicMismatch(
            f"topics with the wrong partition count: {found}; expected {partitions} (topic_partitions). "
            "Topics keyed by request id must all have the same count: recreate these topics with "
            f"{partitions} partitions, or set topic_partitions to match every topic"
        )


def _new_topic(name: str, partitions: int, replication: int, configs: dict[str, str] | None) -> NewTopic:
    return NewTopic(name=name, num_partitions=partitions, replication_factor=replication, topic_configs=configs or {})


async def _create(admin: AIOKafkaAdminClient, new: list[NewTopic]) -> dict[str, int]:
    """Create topics; returns {name: error_code} of those refused for their configs."""
    response: Any = await admin.create_topics(new)
    refused: dict[str, int] = {}
    by_name = {t.name: t for t in new}
    for entry in response.topic_errors:
        name, code = entry[0], entry[1]
        if code in (0, _TOPIC_ALREADY_EXISTS):
            continue
        if code in _CONFIG_REFUSED and by_name[name].topic_configs:
            refused[name] = code
            continue
        raise for_code(code)(f"creating topic {name}")
    return refused


async def _warn_if_not_compacted(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    # A topic created earlier by someone else (or auto-created) keeps its policy: say so.
    if not names:
        return
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    except Exception:  # a broker without DescribeConfigs: nothing to check
        return
    for response in responses:
        for resource in response.resources:
            _, _, _, name, entries = resource[:5]
            policy = {e[0]: e[1] for e in entries}.get("cleanup.policy")
            if policy is not None and "compact" not in policy:
                log.warning("topic %s exists with cleanup.policy=%s; expected compact", name, policy)

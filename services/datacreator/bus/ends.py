"""Where a partition ends, also on a broker whose ListOffsets answers short.

Tansu (the embedded broker) answers ListOffsets (latest), aiokafka's `end_offsets`, with the base
offset of a partition's last batch plus one: after a batch of five records the end reads as its
first record until the next write. A fetch answer's high watermark is right. Such a broker says so
in its profile (`EmbeddedBroker.client_overrides()["broker"]["short_list_offsets"]`), and its ends
are then read from a fetch of the last batch; other brokers are asked once, as usual.

What this does not reach: a consumer group's own "latest" reset (a new group of
`datacreator.consumer` that does not read from the beginning) asks ListOffsets inside aiokafka, so
on such a broker it may also get the records of the last batch written before it joined.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from datacreator.bus.factory import client_overrides, make_consumer
from datacreator.config import Settings

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


def short_list_offsets(settings: Settings) -> bool:
    """Whether the broker's ListOffsets may answer the last batch's first record + 1."""
    return bool(client_overrides(settings, "broker").get("short_list_offsets"))


async def partition_ends(
    settings: Settings, consumer: AIOKafkaConsumer, tps: Iterable[TopicPartition]
) -> dict[TopicPartition, int]:
    """{partition: offset after its last record} as of now. `consumer` is only asked, never moved."""
    wanted = list(tps)
    if not wanted:
        return {}
    return await high_watermarks(settings, dict(await consumer.end_offsets(wanted)))


async def high_watermarks(settings: Settings, listed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
    """ListOffsets answers, as they are from a broker whose profile does not say they may be short;
    else corrected by fetching each partition's last batch (it starts at the listed end - 1) on a
    consumer of its own, so that no caller's positions move. A partition the probe cannot read in
    time keeps its listed end: short, never past the end."""
    ends = dict(listed)
    probed = {tp: end for tp, end in listed.items() if end > 0} if short_list_offsets(settings) else {}
    if not probed:
        return ends
    probe = make_consumer(settings)
    try:
        await probe.start()
        probe.assign(list(probed))
        for tp, end in probed.items():
            probe.seek(tp, end - 1)
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        pending = set(probed)
        while pending and time.monotonic() < deadline:
            await probe.getmany(*pending, timeout_ms=200)
            for tp in list(pending):
                highwater = probe.highwater(tp)
                if highwater is not None:
                    ends[tp] = max(highwater, probed[tp])
                    pending.discard(tp)
        if pending:
            log.warning("end offsets: no fetch answer for %s in %.0f s; keeping the listed ends",
                        sorted((tp.topic, tp.partition) for tp in pending), PROBE_TIMEOUT_S)
    except KafkaError as exc:
        log.warning("end offsets: fetching the last batches failed (%s); keeping the listed ends", type(exc).__name__)
    finally:
        with contextlib.suppress(Exception):
            await probe.stop()
    return ends

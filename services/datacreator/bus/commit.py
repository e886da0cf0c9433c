"""Committing a consumer's offsets, bounded in time and safe to cancel.

aiokafka sends the OffsetCommit request in a task of its own behind `asyncio.shield`. Once the
caller's wait is cancelled (a timeout, a shutdown), Python 3.11's shield forgets that task: if its
request then fails, for instance because the broker was stopped right after, asyncio prints a
"Task exception was never retrieved" traceback on stderr at garbage collection. The request's
outcome no longer matters (the offsets are committed again, or redelivered), so it is taken here.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import OffsetAndMetadata


async def commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata] | dict[TopicPartition, int],
                 timeout_s: float | None = None) -> None:
    """`consumer.commit(offsets)`; raises KafkaTimeoutError after `timeout_s`."""
    task = asyncio.ensure_future(consumer.commit(offsets))  # type: ignore[arg-type]
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        _abandon(task)
        raise
    if not done:
        _abandon(task)
        raise KafkaTimeoutError(f"commit not done within {timeout_s:g}s")
    task.result()


def _abandon(task: asyncio.Future[None]) -> None:
    task.cancel()
    task.add_done_callback(_take_outcome)
    for running in asyncio.all_tasks():
        if getattr(running.get_coro(), "__qualname__", "").endswith("._do_commit_offsets"):
            running.add_done_callback(_take_outcome)


def _take_outcome(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()

"""Talking to a running bus from outside: publish requests, follow statuses, read examples."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson

from datacreator.bus.codec import M, PoisonMessage, decode, encode, encode_key
from datacreator.bus.factory import make_producer
from datacreator.bus.readback import StatusWatcher, follow_topics, read_models
from datacreator.config import Settings
from datacreator.contracts import CancelRequest, CreationRequest, Example, RequestStatus


def load_request(path: str | Path, **overrides: Any) -> CreationRequest:
    raw = orjson.loads(Path(path).read_bytes())
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return CreationRequest.model_validate(raw)


async def publish_raw(settings: Settings, topic: str, key: str | None, value: bytes) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=encode_key(key))
    finally:
        await producer.stop()


async def publish(settings: Settings, topic: str, key: str, message: Any) -> None:
    await publish_raw(settings, topic, key, encode(message))


async def submit(settings: Settings, request: CreationRequest) -> str:
    await publish(settings, settings.topics.requests, request.request_id, request)
    return request.request_id


async def cancel(settings: Settings, request_id: str, reason: str = "cancelled by user") -> None:
    await publish(settings, settings.topics.requests, request_id, CancelRequest(request_id=request_id, reason=reason))


async def wait_for_status(
    settings: Settings,
    request_id: str,
    check: Callable[[RequestStatus], bool],
    on_status: Callable[[RequestStatus], None] | None = None,
    timeout_s: float | None = None,
    *,
    awaited: str = "as awaited",
) -> RequestStatus:
    """Follow the status topic until a status of the request passes `check`; `awaited` names it in the timeout."""
    watcher = await StatusWatcher(settings).start()
    deadline = time.monotonic() + timeout_s if timeout_s else None
    seen: RequestStatus | None = None
    try:
        while True:
            status = watcher.latest.get(request_id)
            if status is not None and status is not seen:
                seen = status
                if on_status is not None:
                    on_status(status)
                if check(status):
                    return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"request {request_id} not {awaited} after {timeout_s} s (last: {status.state if status else 'none'})")
            await watcher.wait_change(0.5)
    finally:
        await watcher.stop()


async def wait_for_final(
    settings: Settings,
    request_id: str,
    on_status: Callable[[RequestStatus], None] | None = None,
    timeout_s: float | None = None,
) -> RequestStatus:
    """Follow the status topic until the request reaches a final state."""
    return await wait_for_status(settings, request_id, lambda s: s.state.final, on_status, timeout_s, awaited="final")


async def read_messages(settings: Settings, topic: str, model: type[M], request_id: str | None = None) -> AsyncIterator[M]:
    """The `model` messages on `topic` so far (of one request, or all); an unreadable record is skipped."""
    async for _, message in read_models(settings, topic, model):
        if request_id is None or getattr(message, "request_id", None) == request_id:
            yield message


async def latest_statuses(settings: Settings, request_id: str | None = None) -> dict[str, RequestStatus]:
    """The latest status of every request (or of one) on the status topic, as of now: by
    `RequestStatus.supersedes`, not the last record (compaction keeps the highest offset)."""
    latest: dict[str, RequestStatus] = {}
    async for status in read_messages(settings, settings.topics.status, RequestStatus, request_id):
        if status.supersedes(latest.get(status.request_id)):
            latest[status.request_id] = status
    return latest


async def latest_status(settings: Settings, request_id: str) -> RequestStatus | None:
    return (await latest_statuses(settings, request_id)).get(request_id)


async def read_examples(settings: Settings, request_id: str | None = None) -> AsyncIterator[Example]:
    """The distinct examples published so far (of one request, or all): a redelivery is dropped by id."""
    seen: set[str] = set()
    async for example in read_messages(settings, settings.topics.examples, Example, request_id):
        if example.example_id not in seen:
            seen.add(example.example_id)
            yield example


async def collect_examples(settings: Settings, request_id: str) -> list[Example]:
    return [example async for example in read_examples(settings, request_id)]


class JsonlWriter:
    """Writes each example once (by id) as it arrives and flushes it, so that a run stopped halfway
    (timeout, Ctrl-C, a stalled request) keeps every example it was given."""

    def __init__(self, path: str | Path, with_metadata: bool = False) -> None:
        self._out = open(path, "wb")
        self._with_metadata = with_metadata
        self._seen: set[str] = set()

    def add(self, example: Example) -> bool:
        if example.example_id in self._seen:
            return False
        self._seen.add(example.example_id)
        row = example.model_dump(mode="json") if self._with_metadata else example.data
        self._out.write(orjson.dumps(row) + b"\n")
        self._out.flush()
        return True

    @property
    def written(self) -> int:
        return len(self._seen)

    def close(self) -> None:
        self._out.close()


def write_jsonl(path: str | Path, examples: list[Example], with_metadata: bool = False) -> None:
    writer = JsonlWriter(path, with_metadata)
    try:
        for example in examples:
            writer.add(example)
    finally:
        writer.close()


async def stream_examples(settings: Settings, request_id: str, writer: JsonlWriter) -> None:
    """Hand every example of one request to `writer` as it lands on the examples topic (until cancelled)."""
    async for record in follow_topics(settings, [settings.topics.examples]):
        try:
            example = decode(Example, record.value)
        except PoisonMessage:
            continue
        if example.request_id == request_id:
            writer.add(example)

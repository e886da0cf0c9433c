"""Held `latest` outputs (bus/runtime.py, HOLD_S): the newest value of a key stands for the records
before it, a record is finished only once the value carrying its state is acknowledged, and a
later write of the same key never overtakes a held one. Drives a ServiceRunner without a broker:
what it would produce is recorded in order."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition

from datacreator.bus import runtime
from datacreator.bus.runtime import BaseHandler, Output, ServiceRunner, _PartitionTrack
from datacreator.config import Settings
from datacreator.contracts import Usage


class _Ordered(BaseHandler):
    name = "held-test"
    inputs: dict[str, Any] = {"in": Usage}
    ordered = True


def _runner(replies: list[list[Output]]) -> tuple[ServiceRunner, list[tuple[str, str | None, Any]]]:
    runner = ServiceRunner(Settings(), _Ordered())
    sent: list[tuple[str, str | None, Any]] = []

    async def publish(outputs: list[Output], producer: Any = None) -> None:
        sent.extend((o.topic, o.key, o.value) for o in outputs)

    async def handle(record: Any, delivery: Any) -> tuple[list[Output], Any]:
        return replies.pop(0), None

    runner._publish = publish  # type: ignore[method-assign]
    runner._handle = handle  # type: ignore[method-assign]
    return runner, sent


def _record(offset: int) -> SimpleNamespace:
    return SimpleNamespace(topic="in", partition=0, offset=offset, key=b"r1", value=b"{}", timestamp=0)


async def _process(runner: ServiceRunner, track: _PartitionTrack, offset: int) -> None:
    track.add(offset)
    runner._in_flight += 1
    await runner._process(TopicPartition("in", 0), track, _record(offset))


def _state(n: int) -> Usage:
    return Usage(prompt_tokens=n)


async def test_the_newest_held_value_stands_for_the_records_before_it():
    runner, sent = _runner([
        [Output("tasks", "r1", _state(1)), Output("state", "r1", _state(1), latest=True)],
        [Output("tasks", "r1", _state(2)), Output("state", "r1", _state(2), latest=True)],
    ])
    track = _PartitionTrack()
    await _process(runner, track, 0)
    await _process(runner, track, 1)
    assert sent == [("tasks", "r1", _state(1)), ("tasks", "r1", _state(2))]  # the others go out at once
    assert track.committable() is None  # neither record is finished before its state is acknowledged
    await runner._flush_held()
    assert sent[2:] == [("state", "r1", _state(2))]  # one write for both
    assert track.committable() == 2


async def test_a_later_write_of_a_held_key_goes_out_after_it():
    runner, sent = _runner([[Output("state", "r1", _state(1), latest=True)]])
    track = _PartitionTrack()
    await _process(runner, track, 0)
    await runner.publish([Output("state", "r1", None)])  # e.g. a tombstone from a timer
    assert sent == [("state", "r1", _state(1)), ("state", "r1", None)]
    assert track.committable() == 1


async def test_held_values_are_due_after_a_number_of_records_or_a_time(monkeypatch):
    monkeypatch.setattr(runtime, "HOLD_RECORDS", 2)
    runner, _ = _runner([[Output("state", f"r{i}", _state(i), latest=True)] for i in range(2)])
    track = _PartitionTrack()
    await _process(runner, track, 0)
    assert not runner._hold_due()
    await _process(runner, track, 1)
    assert runner._hold_due()
    monkeypatch.setattr(runtime, "HOLD_RECORDS", 100)
    runner._held_since -= runtime.HOLD_S
    assert runner._hold_due()


async def test_a_handler_that_is_not_ordered_sends_latest_values_at_once():
    runner, sent = _runner([[Output("state", "r1", _state(1), latest=True)]])
    runner.handler.ordered = False  # type: ignore[misc]
    track = _PartitionTrack()
    await _process(runner, track, 0)
    assert sent == [("state", "r1", _state(1))]
    assert track.committable() == 1

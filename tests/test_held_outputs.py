"""Held `latest` outputs (bus/runtime.py, HOLD_S): the newest value of a key stands for the records
before it, a record is finished only once the value carrying its state is acknowledged, and a
later write of the same key never overtakes a held one. Drives a ServiceRunner without a broker:
what it would produce is recorded in order."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition

from datacreator.bus import runtime
from datacreator.bus.runtime import BaseHandler, Deferred, Output, ServiceRunner, _PartitionTrack, value_of
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
        sent.extend((o.topic, o.key, value_of(o)) for o in outputs)  # built as it is encoded

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
    await runner._process(TopicPartition("in", 0), track, [_record(offset)])


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


class _Plan:
    """A state that a step changes in two halves, with a wait in between (as a step that embeds
    texts in a thread does), and a snapshot of it that counts how often it is built."""

    def __init__(self) -> None:
        self.n = 0
        self.halfway = False
        self.built = 0

    def snapshot(self) -> Usage:
        self.built += 1
        assert not self.halfway, "a deferred snapshot was built in the middle of a step"
        return _state(self.n)

    def output(self) -> Output:
        return Output("state", "r1", Deferred(Usage, self.snapshot), latest=True)


async def test_of_the_deferred_values_held_for_a_key_only_the_one_sent_is_built_with_the_state_then():
    plan = _Plan()
    replies = []
    for _ in range(3):
        replies.append([plan.output()])
    runner, sent = _runner(replies)
    track = _PartitionTrack()
    for offset in range(3):
        plan.n = offset + 1
        await _process(runner, track, offset)
    assert plan.built == 0 and track.committable() is None
    plan.n = 7  # changed since, under the key's lock as a step would: the snapshot sent is of now
    await runner._flush_held()
    assert sent == [("state", "r1", _state(7))] and plan.built == 1
    assert track.committable() == 3


async def test_a_deferred_value_is_not_built_while_another_task_is_in_a_step_of_its_key():
    plan = _Plan()
    runner, sent = _runner([[plan.output()], [plan.output()]])
    track = _PartitionTrack()
    plan.n = 1
    await _process(runner, track, 0)
    inside, go_on = asyncio.Event(), asyncio.Event()

    async def step() -> None:  # another writer of r1, e.g. a deadline step on the same key
        async with runner.key_lock("r1"):
            plan.halfway = True
            inside.set()
            await go_on.wait()
            plan.n, plan.halfway = 2, False

    other = asyncio.create_task(step())
    await inside.wait()
    await runner._flush_held()  # from the commit loop, say: r1 is mid-step
    assert sent == [] and plan.built == 0 and track.committable() is None and ("state", "r1") in runner._held
    go_on.set()
    await other
    await runner._flush_held()
    assert sent == [("state", "r1", _state(2))] and track.committable() == 1


async def test_the_holder_of_a_key_writing_it_sends_the_held_deferred_value_first():
    plan = _Plan()
    runner, sent = _runner([[plan.output()]])
    track = _PartitionTrack()
    plan.n = 1
    await _process(runner, track, 0)
    async with runner.key_lock("r1"):  # a timer's tombstone, written under the key's lock
        await runner.publish([Output("state", "r1", None)])
    assert sent == [("state", "r1", _state(1)), ("state", "r1", None)] and track.committable() == 1


def test_a_process_freezes_what_it_holds_at_its_first_service_start_once():
    import gc

    runtime.freeze_startup_objects()
    frozen = gc.get_freeze_count()
    assert frozen > 0  # modules, models and settings are out of the cycle collector's scans
    later = [[object()] for _ in range(1000)]  # what requests bring is collected as before
    runtime.freeze_startup_objects()
    assert gc.get_freeze_count() == frozen and later

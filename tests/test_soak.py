"""State of ended requests is released a while after the end (final_state_ttl_s).

Before the release, the planner's plans and last-status times, every service's latest statuses and
the sink's written-id sets grew by one entry per request for the life of the process (about 37 KB
per request in `python -m benchmarks soak`). The handler tests drive the release with a clock moved
forward; the last test runs every service on the real broker and the simulator.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from datacreator import remote
from datacreator.bus.codec import encode
from datacreator.bus.readback import StatusWatcher
from datacreator.bus.runtime import Delivery
from datacreator.config import Settings
from datacreator.contracts import (
    CreationRequest,
    Example,
    RejectReason,
    RequestState,
    RequestStatus,
    Strategy,
    TaskOutcome,
    Usage,
)
from datacreator.handlers.curator import REOPENED_KEPT, CuratorHandler
from datacreator.handlers.planner import PlannerHandler
from datacreator.handlers.sink import PartitionFiles
from datacreator.logic.dedup import example_id
from datacreator.logic.retention import ReleaseClock
from datacreator.serve import SERVICE_NAMES, ServiceGroup
from datacreator.stack import LLMTarget, endpoint_json
from tests.helpers import MCQ, MCQ_INSTRUCTION, candidate, item, make_task

SETTINGS = Settings(endpoints_json='{"default": {"base_url": "http://127.0.0.1:9", "model": "m"}}', final_state_ttl_s=60)
TOPICS = SETTINGS.topics


def follow(watcher: StatusWatcher, status: RequestStatus) -> None:
    """A status as the watcher reads it from the topic."""
    watcher._apply(SimpleNamespace(value=encode(status)))


def delivery(topic: str, message: object, partition: int = 0) -> Delivery:
    return Delivery(topic, partition, 0, getattr(message, "request_id", None), encode(message))


def final_status(request_id: str, ended: float, state: RequestState = RequestState.COMPLETED) -> RequestStatus:
    return RequestStatus(request_id=request_id, state=state, target_count=2, updated_at=ended, finished_at=ended)


def sink_example(request_id: str, n: int) -> Example:
    data = {"text": f"example number {n} of {request_id}", "label": n % 2 == 0}
    return Example(example_id=example_id(request_id, data), request_id=request_id, data=data, strategy=Strategy.random,
                   reference_ids=[None], task_id=f"{request_id}-t0", chain=0, step=0, model="m")


def test_release_clock_holds_then_releases_and_remembers_a_bounded_number() -> None:
    clock = ReleaseClock(after_s=10, remembered=2)
    clock.ended("a", at=100, state=RequestState.COMPLETED)
    clock.ended("b", at=105, state=RequestState.CANCELLED)
    assert clock.due(109) == [] and clock.released("a") is None
    assert clock.due(110) == ["a"] and clock.released("a") == RequestState.COMPLETED
    assert clock.due(200) == ["b"] and clock.pending() == 0
    clock.release("c", RequestState.FAILED)  # past its hold when first seen
    assert clock.released("a") is None, "only the last `remembered` ids are kept"
    assert (clock.released("b"), clock.released("c")) == (RequestState.CANCELLED, RequestState.FAILED)


async def test_planner_drops_an_ended_plan_after_its_hold_and_ignores_a_redelivered_request() -> None:
    planner = PlannerHandler(SETTINGS)
    request = CreationRequest(instruction=MCQ_INSTRUCTION, formatting_example=MCQ, target_count=2, examples_per_call=2, chains=1)
    outputs = await planner.handle(request, delivery(TOPICS.requests, request, partition=1))
    (task,) = [o.value for o in outputs if o.topic == TOPICS.tasks]
    outcome = TaskOutcome(task_id=task.task_id, request_id=task.request_id, chain=task.chain, step=task.step,
                          references=task.references, accepted=[{"example_id": f"e{n}", "data": MCQ} for n in range(2)],
                          usage=Usage(prompt_tokens=10, completion_tokens=10))
    outputs = await planner.handle(outcome, delivery(TOPICS.outcomes, outcome, partition=1))
    assert [o.value.state for o in outputs if o.topic == TOPICS.status] == [RequestState.COMPLETED]
    rid = request.request_id

    assert planner.release_due(time.time()) == 0 and rid in planner.plans  # late outcomes still count
    assert planner.release_due(time.time() + 61) == 1
    # The plan stays until its snapshot's tombstone is acknowledged (on the broker:
    # test_compaction.test_a_finished_requests_snapshot_is_deleted_after_the_retention); then it goes.
    assert rid in planner.plans
    planner._forget(rid)
    assert rid not in planner.plans and rid not in planner.partition_of and rid not in planner._last_status
    assert await planner.handle(request, delivery(TOPICS.requests, request, partition=1)) == []  # not started again
    assert await planner.handle(outcome, delivery(TOPICS.outcomes, outcome, partition=1)) == []


def test_status_watcher_drops_final_statuses_after_the_hold_and_still_knows_them_closed() -> None:
    watcher = StatusWatcher(SETTINGS, release_after_s=60)
    now = time.time()
    follow(watcher, RequestStatus(request_id="running", state=RequestState.RUNNING, target_count=2, updated_at=now))
    follow(watcher, final_status("ended", now))
    follow(watcher, final_status("long-ago", now - 3600, RequestState.CANCELLED))  # read back after a restart
    assert set(watcher.latest) == {"running", "ended"}
    assert watcher.is_closed("long-ago") and watcher.released_state("long-ago") == RequestState.CANCELLED

    assert watcher.release_due(now + 61) == 1
    assert set(watcher.latest) == {"running"}
    assert watcher.is_closed("ended") and not watcher.is_closed("running")
    follow(watcher, final_status("ended", now + 62))  # a late status after the release stays out
    assert "ended" not in watcher.latest

    keeping = StatusWatcher(SETTINGS)  # clients and `top`: nothing is dropped
    follow(keeping, final_status("long-ago", now - 3600))
    assert keeping.release_due(now + 10_000) == 0 and "long-ago" in keeping.latest


async def test_curator_answers_a_candidate_of_a_released_request_as_closed() -> None:
    curator = CuratorHandler(SETTINGS)
    task = make_task(request_id="req-old", target=5)
    follow(curator.status, final_status("req-old", time.time() - 3600, RequestState.CANCELLED))
    assert "req-old" not in curator.status.latest
    outputs = await curator.handle(candidate(task, [item(1)]), delivery(TOPICS.candidates, task))
    assert [o.topic for o in outputs] == [TOPICS.rejected, TOPICS.outcomes]
    assert outputs[0].value.reason == RejectReason.request_closed and "CANCELLED" in outputs[0].value.detail
    assert "req-old" not in curator.state.requests


def test_sink_lets_idle_requests_go_and_still_drops_a_late_duplicate(tmp_path) -> None:
    files = PartitionFiles(tmp_path, 0, shard_rows=2, fsync=False, release_after_s=60)
    examples = [sink_example("req-1", n) for n in range(3)]
    for example in examples:
        assert files.append(example)
    assert files.held() == 3 and files.requests["req-1"].shard.handle is not None
    assert files.release_idle(time.monotonic() + 61) == 1
    assert files.requests == {}  # ids and the open file are let go

    assert not files.append(examples[0]), "a duplicate after the release is found in the files"
    assert files.append(sink_example("req-1", 3))  # and new rows continue the last shard
    files.close()
    names = sorted(p.name for p in (tmp_path / "req-1").iterdir())
    assert names == ["part-0-00000.jsonl", "part-0-00001.jsonl"]
    assert [len((tmp_path / "req-1" / n).read_bytes().splitlines()) for n in names] == [2, 2]

    restarted = PartitionFiles(tmp_path, 0, shard_rows=2, fsync=False, release_after_s=0)
    restarted.load()  # written longer ago than the hold: nothing is read into memory
    assert restarted.requests == {}
    assert not restarted.append(examples[1])
    restarted.close()


@pytest.mark.timeout(180)
async def test_services_release_the_state_of_ended_requests(bus_settings, simulator, tmp_path) -> None:
    target = LLMTarget(simulator.base_url, "datacreator-simulator")
    settings = bus_settings.with_updates(endpoints_json=endpoint_json(target), final_state_ttl_s=1.0,
                                         snapshot_retention_s=1.0,  # the planner's snapshot retention, where it has one
                                         sink_dir=str(tmp_path), sink_fsync=False)
    group = await ServiceGroup(settings, SERVICE_NAMES).start()
    handlers = {runner.handler.name: runner.handler for runner in group.runners}

    def held() -> dict[str, int]:
        return {
            "plans": len(handlers["planner"].plans),
            "planner_status_times": len(handlers["planner"]._last_status),
            "generator_statuses": len(handlers["generator"].status.latest),
            "curator_statuses": len(handlers["curator"].status.latest),
            # COMPLETED requests read back for late candidates stay in a small LRU (REOPENED_KEPT)
            "curator_requests": len(set(handlers["curator"].state.requests) - set(handlers["curator"]._reopened)),
            "curator_reopened_over_bound": max(0, len(handlers["curator"]._reopened) - REOPENED_KEPT),
            "sink_requests": handlers["sink"].held_requests(),
        }

    try:
        requests = [CreationRequest(instruction=MCQ_INSTRUCTION, formatting_example=MCQ, target_count=3,
                                    examples_per_call=3, chains=1, strategy=Strategy.none) for _ in range(30)]
        for request in requests:
            await remote.submit(settings, request)
        for request in requests:
            final = await remote.wait_for_final(settings, request.request_id, timeout_s=90)
            assert final.state == RequestState.COMPLETED, final.error
        assert sum(1 for p in tmp_path.iterdir() if p.is_dir()) == 30
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while any(held().values()) and loop.time() < deadline:
            await asyncio.sleep(0.25)
        assert held() == dict.fromkeys(held(), 0)
        closed = handlers["generator"].status
        assert all(closed.is_closed(r.request_id) for r in requests)
    finally:
        await group.stop()

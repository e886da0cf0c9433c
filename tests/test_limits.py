"""Every limit on a request is answered with REJECTED and a reason that names it: message size,
formatting-example size, depth, values and string lengths, target_count, examples_per_call,
instruction length, calls in flight per request, and the cap on active requests."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from datacreator import remote
from datacreator.bus.codec import PoisonMessage, decode_request
from datacreator.bus.factory import make_producer
from datacreator.contracts import (
    MAX_EXAMPLES_PER_CALL,
    MAX_INSTRUCTION_CHARS,
    MAX_TARGET_COUNT,
    CreationRequest,
    RequestState,
)
from datacreator.logic.planning import PlannerLimits
from datacreator.serve import ServiceGroup
from datacreator.stack import LLMTarget, endpoint_json
from tests.helpers import rejection_reason
from tests.test_poison import FAST_GROUPS, partition_of

SEED = {"question": "What do bees make?", "answer": "honey"}
LIMITS = PlannerLimits()


def _nested(depth: int) -> dict[str, Any]:
    value: Any = "leaf"
    for _ in range(depth - 1):
        value = {"k": value}
    return {"root": value}


def _request(**changes: Any) -> dict[str, Any]:
    return {"instruction": "Write quiz questions.", "formatting_example": SEED, "target_count": 10, **changes}


# Over-limit requests and a piece of the reason each must carry.
OVER_LIMIT: dict[str, tuple[dict[str, Any], str]] = {
    "target-count": (_request(target_count=MAX_TARGET_COUNT + 1), "target_count"),
    "target-zero": (_request(target_count=0), "target_count"),
    "per-call": (_request(examples_per_call=MAX_EXAMPLES_PER_CALL + 1), "examples_per_call"),
    "in-flight": (_request(examples_per_call=MAX_EXAMPLES_PER_CALL, chains=LIMITS.max_examples_in_flight // MAX_EXAMPLES_PER_CALL + 1),
                  "examples_per_call * chains"),
    "instruction": (_request(instruction="x" * (MAX_INSTRUCTION_CHARS + 1)), "instruction"),
    "request-id": (_request(request_id="r" * 129), "request_id"),
    "depth": (_request(formatting_example=_nested(LIMITS.max_depth + 1)), f"nested deeper than {LIMITS.max_depth}"),
    "string": (_request(formatting_example={"q": "x" * (LIMITS.max_string_chars + 1), "a": "b"}),
               f"string longer than {LIMITS.max_string_chars}"),
    "key": (_request(formatting_example={"k" * (LIMITS.max_string_chars + 1): "v", "a": "b"}), f"key longer than {LIMITS.max_string_chars}"),
    "nodes": (_request(formatting_example={"items": list(range(LIMITS.max_nodes + 1))}), f"more than {LIMITS.max_nodes} values"),
    "example-bytes": (_request(formatting_example={f"f{i}": "y" * 15_000 for i in range(5)}), "the limit is 65536"),
    "label-space": (_request(label_space=list(range(1001))), "label_space"),
    "temperature": (_request(model={"temperature": 2.5}), "model.temperature"),
    "max-tokens": (_request(model={"max_tokens": 10**6}), "model.max_tokens"),
}


def _reason(raw: dict[str, Any], max_bytes: int | None = None) -> str | None:
    """What the planner answers: the decode error, else validate_request's reason."""
    try:
        request = decode_request(orjson.dumps(raw), max_bytes)
    except PoisonMessage as exc:
        return str(exc)
    return rejection_reason(request, {"default"}, LIMITS)


@pytest.mark.parametrize("case", sorted(OVER_LIMIT))
def test_each_limit_is_a_rejection_naming_it(case):
    raw, expected = OVER_LIMIT[case]
    reason = _reason(raw)
    assert reason is not None and expected in reason, reason


def test_requests_just_inside_the_limits_are_accepted():
    inside = [
        _request(target_count=MAX_TARGET_COUNT),
        _request(examples_per_call=MAX_EXAMPLES_PER_CALL, chains=LIMITS.max_examples_in_flight // MAX_EXAMPLES_PER_CALL),
        _request(instruction="x" * MAX_INSTRUCTION_CHARS),
        _request(formatting_example=_nested(LIMITS.max_depth - 1)),
        _request(formatting_example={"q": "x" * LIMITS.max_string_chars, "a": "b"}),
    ]
    for raw in inside:
        assert _reason(raw) is None


def test_message_size_limit_applies_before_parsing():
    raw = _request(instruction="x" * 5_000)
    size = len(orjson.dumps(raw))
    assert _reason(raw, max_bytes=size) is None
    reason = _reason(raw, max_bytes=size - 1)
    assert reason == f"message of {size} bytes exceeds the limit of {size - 1}"


@pytest.mark.slow
async def test_limits_through_the_planner_and_the_active_request_cap(bus_settings, make_simulator):
    sim = make_simulator(latency_s=1.0)  # keeps the admitted requests RUNNING while the rest arrive
    settings = bus_settings.with_updates(
        endpoints_json=endpoint_json(LLMTarget(sim.base_url, "datacreator-simulator")),
        max_active_requests=2, max_message_bytes=100_000, **FAST_GROUPS,
    )
    # An over-long request_id cannot be answered under its own id (it goes to the DLQ only).
    cases = {name: case for name, case in OVER_LIMIT.items() if name != "request-id"}
    cases["message-size"] = (_request(metadata={"pad": "y" * 100_000}), "exceeds the limit of 100000")
    running = [CreationRequest(request_id=f"active-{i}", **_request(target_count=1000, chains=1)) for i in range(3)]
    # All in one partition, in this order: the planner sees the active ones before the third.
    partition = partition_of(running[0].request_id, settings.kafka.topic_partitions)
    group = await ServiceGroup(settings, ("planner", "generator", "curator")).start()
    producer = make_producer(settings)
    await producer.start()
    try:
        for request_id, (raw, _) in cases.items():
            await producer.send_and_wait(settings.topics.requests, orjson.dumps({**raw, "request_id": request_id}),
                                         key=request_id.encode())
        for request in running:
            await producer.send_and_wait(settings.topics.requests, request.model_dump_json().encode(),
                                         key=request.request_id.encode(), partition=partition)
        for request_id, (_, expected) in cases.items():
            final = await remote.wait_for_final(settings, request_id, timeout_s=30)
            assert final.state == RequestState.REJECTED and expected in (final.error or ""), (request_id, final.error)
        third = await remote.wait_for_final(settings, "active-2", timeout_s=30)
        assert third.state == RequestState.REJECTED
        assert third.error == "too many active requests (2); the limit is 2"
        for request in running[:2]:
            status = await remote.latest_status(settings, request.request_id)
            assert status is not None and status.state in (RequestState.ACCEPTED, RequestState.RUNNING)
            await remote.cancel(settings, request.request_id)
        for request in running[:2]:
            assert (await remote.wait_for_final(settings, request.request_id, timeout_s=30)).state == RequestState.CANCELLED
    finally:
        await producer.stop()
        await group.stop()

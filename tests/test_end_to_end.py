"""The vertical slice: a request published to the requests topic becomes exactly target_count
distinct, well-formed examples on the examples topic, and a COMPLETED status, through every
service on the real broker with the LLM simulator behind the generator."""

from __future__ import annotations

import orjson
import pytest

from datacreator import remote
from datacreator.contracts import CreationRequest, RequestState, Strategy
from datacreator.serve import ServiceGroup
from datacreator.stack import LLMTarget, endpoint_json
from tests.helpers import MCQ, MCQ_INSTRUCTION, example_records


def _settings_for(bus_settings, simulator):
    target = LLMTarget(simulator.base_url, "datacreator-simulator")
    return bus_settings.with_updates(endpoints_json=endpoint_json(target))


@pytest.mark.parametrize("strategy", [Strategy.none, Strategy.random, Strategy.tree])
async def test_request_becomes_exactly_target_count_examples(bus_settings, simulator, strategy):
    settings = _settings_for(bus_settings, simulator)
    group = await ServiceGroup(settings).start()
    try:
        request = CreationRequest(
            instruction=MCQ_INSTRUCTION,
            formatting_example=MCQ, target_count=23, examples_per_call=5, strategy=strategy, chains=3,
        )
        await remote.submit(settings, request)
        final = await remote.wait_for_final(settings, request.request_id, timeout_s=60)
        assert final.state == RequestState.COMPLETED, final.error
        assert final.accepted == 23
        assert final.llm_calls >= 5

        examples = await example_records(settings, request.request_id)
        ids = [e.example_id for e in examples]
        assert len(ids) == 23 and len(set(ids)) == 23
        for example in examples:
            assert set(example.data) == {"question", "options", "answer"}
            assert set(example.data["options"]) == {"A", "B", "C", "D"}
            assert example.data["answer"] in {"A", "B", "C", "D"}
            assert example.strategy == strategy
            assert example.reference_ids, "every example records what it was made from"
        if strategy != Strategy.none:  # self-reference: later calls are seeded by accepted examples
            assert any(rid is not None for e in examples for rid in e.reference_ids)
    finally:
        await group.stop()


async def test_invalid_request_is_rejected_with_a_reason(bus_settings, simulator):
    settings = _settings_for(bus_settings, simulator)
    group = await ServiceGroup(settings).start()
    try:
        bad = {"request_id": "bad-1", "instruction": "x", "formatting_example": "not an object", "target_count": 3}
        await remote.publish_raw(settings, settings.topics.requests, "bad-1", orjson.dumps(bad))
        final = await remote.wait_for_final(settings, "bad-1", timeout_s=30)
        assert final.state == RequestState.REJECTED
        assert "formatting_example" in (final.error or "")
    finally:
        await group.stop()

"""The label plan end to end: every service on the real broker, the LLM simulator behind the
generator, items rejected on the way; the request ends within one example of each label's target."""

from __future__ import annotations

from collections import Counter

import pytest

from datacreator import remote
from datacreator.contracts import CreationRequest, ModelSpec, RequestState, Strategy
from datacreator.logic.labels import label_text
from datacreator.serve import ServiceGroup
from datacreator.stack import LLMTarget, endpoint_json
from tests.helpers import MCQ, MCQ_INSTRUCTION, example_records

NEWS = {"headline": "Vaccine trial ends early after strong results", "topic": "health"}
TOPICS = ["business", "health", "sports", "tech", "world"]


def _settings_for(bus_settings, simulator, structured_output: str):
    target = LLMTarget(simulator.base_url, "datacreator-simulator")
    return bus_settings.with_updates(endpoints_json=endpoint_json(target, structured_output=structured_output))


@pytest.mark.parametrize(
    ("structured_output", "request_fields", "field", "shares"),
    [
        # Labels pinned per position by the schema; a skewed distribution; a fifth of items broken.
        ("json_schema", {"formatting_example": NEWS, "label_field": "topic", "label_space": TOPICS,
                         "label_distribution": {"business": 0.4, "health": 0.1, "sports": 0.2, "tech": 0.2, "world": 0.1}},
         "topic", {"business": 0.4, "health": 0.1, "sports": 0.2, "tech": 0.2, "world": 0.1}),
        # JSON mode: only the prompt names each item's label; answer letters of multiple choice.
        ("json_object", {"formatting_example": MCQ}, "answer", dict.fromkeys("ABCD", 0.25)),
    ],
    ids=["schema-skewed", "prompt-mcq"],
)
async def test_request_ends_within_one_example_of_every_labels_target(
    bus_settings, make_simulator, structured_output, request_fields, field, shares
):
    simulator = make_simulator(wrong_structure_rate=0.1, copy_rate=0.1)
    settings = _settings_for(bus_settings, simulator, structured_output)
    group = await ServiceGroup(settings).start()
    try:
        request = CreationRequest(
            instruction=MCQ_INSTRUCTION if field == "answer" else "Write news headlines, each with its topic.",
            target_count=110, examples_per_call=5, strategy=Strategy.random, chains=3,
            model=ModelSpec(temperature=0.8, top_p=0.95), **request_fields,
        )
        await remote.submit(settings, request)
        final = await remote.wait_for_final(settings, request.request_id, timeout_s=120)
        assert final.state == RequestState.COMPLETED, final.error
        assert final.accepted == 110
        assert sum(final.rejected.values()) > 0, "the simulator's faults were meant to reject some items"

        examples = {e.example_id: e for e in await example_records(settings, request.request_id)}
        counts = Counter(label_text(e.data[field]) for e in examples.values())
        assert len(examples) == 110
        assert dict(counts) == final.label_counts
        for label, share in shares.items():
            assert abs(counts[label] - share * 110) <= 1, (label, counts)
            assert abs(final.label_targets[label] - share * 110) < 1
        # The formatting example's key order comes back after the label-first schema.
        assert all(list(e.data) == list(request.formatting_example) for e in examples.values())
        assert (final.model, final.temperature, final.top_p) == ("datacreator-simulator", 0.8, 0.95)
    finally:
        await group.stop()

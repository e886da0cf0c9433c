"""The prompt of one call: wording, formatting examples, response formats, token estimates."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest

from datacreator.contracts import GenerationTask, Reference, Usage
from datacreator.logic.cost import call_cost_usd
from datacreator.logic.prompt import (
    SYSTEM_PROMPT,
    build_messages,
    estimate_call_tokens,
    estimate_prompt_tokens,
    response_format,
)
from datacreator.simulator.generate import Prompt, estimate_tokens, prompt_chars
from tests import helpers

MCQ = {"question": "Where do fish live?", "options": {"A": "trees", "B": "water", "C": "sky"}, "answer": "B"}
MCQ_SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string"},
        "options": {
            "type": "object",
            "properties": {k: {"type": "string"} for k in "ABC"},
            "required": list("ABC"),
            "additionalProperties": False,
        },
        "answer": {"type": "string", "enum": list("ABC")},
    },
    "required": ["question", "options", "answer"],
    "additionalProperties": False,
}


def make_task(references: list[dict] | None = None, n: int = 5, label_space: list | None = None, label_field: str | None = None) -> GenerationTask:
    return helpers.make_task("task-1", request_id="req-1", references=[Reference(data=d) for d in (references or [MCQ])],
                             instruction="  Write multiple-choice questions about nature.  ", num_examples=n,
                             example_schema=MCQ_SCHEMA, label_field=label_field, label_space=label_space)


def test_messages_have_system_and_user_parts():
    messages = build_messages(make_task(n=7))
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == SYSTEM_PROMPT == "You create training data. Answer with JSON only."
    user = messages[1]["content"]
    assert user.startswith("Write multiple-choice questions about nature.\n\nHere is an example of the format:\n\n```json\n")
    assert "Write exactly 7 new examples of the same JSON structure, each different from the examples above and from each other." in user
    assert "Do not copy the example" in user
    assert user.endswith('Return one JSON object: {"examples": [...]} with exactly 7 items.')
    assert "must be one of" not in user


def test_reference_is_indented_json_in_original_key_order():
    data = {"zeta": 1, "alpha": {"y": "é", "b": [1, 2]}, "mid": None}
    user = build_messages(make_task([data]))[1]["content"]
    block = user.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert block == json.dumps(data, indent=2, ensure_ascii=False)
    assert json.loads(block) == data
    assert list(json.loads(block)) == ["zeta", "alpha", "mid"]


def test_several_references_use_the_plural_and_one_fence_each():
    refs = [MCQ, {**MCQ, "question": "What do cows eat?"}, {**MCQ, "answer": "C"}]
    user = build_messages(make_task(refs, n=3))[1]["content"]
    assert "Here are examples of the format:" in user
    assert "Here is an example" not in user
    assert user.count("```json") == 3
    assert "Do not copy the examples" in user


def test_label_space_sentence_names_field_and_values():
    user = build_messages(make_task(label_space=["A", "B", "C"], label_field="answer"))[1]["content"]
    assert 'The "answer" field must be one of: "A", "B", "C".' in user
    numeric = build_messages(make_task(label_space=[0, 1], label_field="meta.label"))[1]["content"]
    assert 'The "meta.label" field must be one of: 0, 1.' in numeric


def test_simulator_reads_count_and_examples_back():
    refs = [MCQ, {**MCQ, "question": "Which animal barks?"}]
    prompt = Prompt.read(build_messages(make_task(refs, n=4)))
    assert prompt.count == 4
    assert prompt.examples and prompt.examples[0] in refs


def test_simulator_reads_the_planned_labels_back():
    task = make_task(n=3, label_space=[True, False], label_field="meta.ok").model_copy(update={"planned_labels": [False, True, False]})
    user = build_messages(task)[1]["content"]
    assert 'The "meta.ok" of the 3 examples, in order: false, true, false.' in user
    prompt = Prompt.read(build_messages(task))
    assert (prompt.planned_field, prompt.planned_labels) == ("meta.ok", [False, True, False])
    assert Prompt.read(build_messages(make_task(n=3))).planned_labels is None


@pytest.mark.parametrize("n", [1, 5, 50])
def test_json_schema_response_format_holds_exactly_n_examples(n):
    fmt = response_format(make_task(n=n), "json_schema")
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["name"] == "examples" and fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    assert schema["required"] == ["examples"] and schema["additionalProperties"] is False
    items = schema["properties"]["examples"]
    assert items["minItems"] == items["maxItems"] == n and items["items"] == MCQ_SCHEMA
    jsonschema.validate({"examples": [MCQ] * n}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"examples": [MCQ] * (n + 1)}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"examples": [MCQ] * n, "note": "extra"}, schema)


def test_other_response_formats():
    task = make_task()
    assert response_format(task, "json_object") == {"type": "json_object"}
    assert response_format(task, "none") is None
    with pytest.raises(ValueError):
        response_format(task, "yaml")  # type: ignore[arg-type]


def test_token_estimates_cover_what_the_simulator_counts():
    messages = build_messages(make_task(n=5))
    chars = sum(len(m["content"]) for m in messages)
    estimate = estimate_prompt_tokens(messages)
    assert estimate >= math.ceil(chars / 4)
    assert estimate >= estimate_tokens(prompt_chars(messages))
    assert estimate <= math.ceil(chars / 4) + 4 * len(messages) + 5  # only a few framing tokens on top
    assert estimate_call_tokens(messages, 512) == estimate + 512
    longer = build_messages(make_task([{**MCQ, "question": "x" * 4000}]))
    assert estimate_prompt_tokens(longer) - estimate >= (4000 - len(MCQ["question"])) // 4


def test_cost_from_prices():
    usage = Usage(prompt_tokens=1_000, completion_tokens=500)
    assert call_cost_usd(usage, 0.15, 0.60) == pytest.approx(1_000 * 0.15e-6 + 500 * 0.60e-6)
    assert call_cost_usd(usage, 0.0, 0.0) == 0.0

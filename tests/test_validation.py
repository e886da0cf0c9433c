"""Schema derivation, label inference and ExampleValidator verdicts, cross-checked with jsonschema."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datacreator.contracts import RejectReason
from datacreator.logic.shape import batch_schema, example_schema, get_path, infer_label
from datacreator.logic.validation import ExampleValidator

MC = {"question": "Which planet is largest?", "options": {"A": "Mars", "B": "Jupiter", "C": "Venus", "D": "Earth"}, "answer": "B"}
NLI = {"premise": "A man plays a guitar.", "hypothesis": "A person makes music.", "label": 0}
BOOLQ = {"passage": "Water boils at 100 C at sea level.", "question": "does water boil at 100 c", "answer": True}
NESTED = {
    "dialog": [{"speaker": "user", "text": "hi"}, {"speaker": "bot", "text": "hello"}],
    "scores": [0.5, 0.25],
    "meta": {"source": "forum", "tags": ["greeting"], "turns": 2},
    "sample": {"label": False},
}


def with_(base: dict, path: str, value: Any) -> dict:
    item = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = item
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return item


def without(base: dict, path: str) -> dict:
    item = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = item
    for part in parents:
        node = node[part]
    del node[last]
    return item


# -- label inference ---------------------------------------------------------------------------


def test_infer_label_cases() -> None:
    assert infer_label(MC) == ("answer", ["A", "B", "C", "D"])
    assert infer_label({"q": "x", "choices": {"1": "a", "2": "b", "3": "c"}, "gold": "2"}) == ("gold", ["1", "2", "3"])
    assert infer_label({"q": "x", "options": {"A": "a", "B": "b"}, "correct_answer": "A"}) == ("correct_answer", ["A", "B"])
    assert infer_label(BOOLQ) == ("answer", [True, False])
    assert infer_label(NLI) == (None, None)  # 0/1/2 cannot be told from one example
    assert infer_label({"q": "x", "options": ["red", "blue", "green"], "answer": 2}) == ("answer", [0, 1, 2])
    assert infer_label({"q": "x", "options": ["red", "blue"], "answer": "blue"}) == ("answer", None)
    assert infer_label(NESTED) == ("sample.label", [True, False])
    assert infer_label({"text": "free text", "summary": "short"}) == (None, None)


def test_get_path() -> None:
    assert get_path(NESTED, "sample.label") is False
    assert get_path(NESTED, "dialog.1.text") == "hello"
    assert get_path(NESTED, "meta.missing") is None
    assert get_path(NESTED, "scores.9", "absent") == "absent"


# -- schema ------------------------------------------------------------------------------------


def walk_objects(schema: dict) -> list[dict]:
    found = []
    if schema.get("type") == "object":
        found.append(schema)
        for sub in schema["properties"].values():
            found += walk_objects(sub)
    if schema.get("type") == "array":
        found += walk_objects(schema.get("items", {}))
    return found


@pytest.mark.parametrize("example", [MC, NLI, BOOLQ, NESTED])
def test_example_schema_is_strict_and_accepts_its_example(example: dict) -> None:
    field, space = infer_label(example)
    schema = example_schema(example, field, space)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(example, schema)
    for obj in walk_objects(schema):
        assert obj["required"] == list(obj["properties"])
        assert obj["additionalProperties"] is False
    loose = example_schema(example, allow_extra_keys=True)
    assert all("additionalProperties" not in obj for obj in walk_objects(loose))


def test_example_schema_types_and_enum() -> None:
    schema = example_schema(NESTED, "sample.label", [True, False])
    props = schema["properties"]
    assert props["scores"] == {"type": "array", "items": {"type": "number"}}
    assert props["meta"]["properties"]["turns"] == {"type": "integer"}
    assert props["meta"]["properties"]["source"] == {"type": "string", "minLength": 1}
    assert props["dialog"]["items"]["required"] == ["speaker", "text"]
    assert props["sample"]["properties"]["label"] == {"type": "boolean", "enum": [True, False]}
    assert example_schema({"tags": []})["properties"]["tags"] == {"type": "array", "items": {}}
    nli = example_schema(NLI, "label", [0, 1, 2])
    assert nli["properties"]["label"] == {"type": "integer", "enum": [0, 1, 2]}
    mixed = example_schema(NLI, "label", ["entailment", 1])
    assert mixed["properties"]["label"] == {"enum": ["entailment", 1]}
    with pytest.raises(ValueError):
        example_schema(NLI, "verdict", [0, 1])


def test_batch_schema() -> None:
    item = example_schema(MC, "answer", ["A", "B", "C", "D"])
    batch = batch_schema(item, 5)
    assert batch == {
        "type": "object",
        "properties": {"examples": {"type": "array", "items": item, "minItems": 5, "maxItems": 5}},
        "required": ["examples"],
        "additionalProperties": False,
    }
    jsonschema.validate({"examples": [MC] * 5}, batch)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"examples": [MC] * 4}, batch)


# -- validator: multiple choice ------------------------------------------------------------------


def reason(validator: ExampleValidator, item: Any) -> RejectReason | None:
    verdict = validator.validate(item)
    return None if verdict is None else verdict.reason


def test_multiple_choice_inferred() -> None:
    v = ExampleValidator(MC)
    assert v.label_field == "answer" and v.label_space == ["A", "B", "C", "D"]
    assert v.validate(MC) is None
    assert v.validate(with_(MC, "answer", "D")) is None
    assert reason(v, with_(MC, "answer", "E")) is RejectReason.label_out_of_space
    assert reason(v, with_(MC, "answer", "a")) is RejectReason.label_out_of_space
    assert reason(v, without(MC, "options.D")) is RejectReason.structure_mismatch
    assert reason(v, with_(MC, "options.E", "Pluto")) is RejectReason.structure_mismatch
    assert reason(v, with_(MC, "extra", "x")) is RejectReason.structure_mismatch
    assert reason(v, with_(MC, "options.B", 5)) is RejectReason.structure_mismatch
    assert reason(v, with_(MC, "question", "")) is RejectReason.empty_field
    assert reason(v, with_(MC, "options.C", " \n\t")) is RejectReason.empty_field
    assert reason(v, with_(MC, "question", "x" * 5001)) is RejectReason.field_too_long
    assert reason(v, [MC]) is RejectReason.structure_mismatch
    assert reason(v, "text") is RejectReason.structure_mismatch


def test_details_name_the_path() -> None:
    v = ExampleValidator(MC)
    assert "options" in v.validate(without(MC, "options.D")).detail
    assert "'D'" in v.validate(without(MC, "options.D")).detail
    assert v.validate(with_(MC, "options.B", 5)).detail.startswith("options.B:")
    assert "extra" in v.validate(with_(MC, "extra", 1)).detail


def test_structure_mismatch_wins_over_empty_field() -> None:
    item = with_(without(MC, "answer"), "question", "")
    assert reason(ExampleValidator(MC), item) is RejectReason.structure_mismatch


def test_extra_keys_allowed_but_options_must_hold_the_answer() -> None:
    v = ExampleValidator(MC, allow_extra_keys=True)
    assert v.validate(with_(MC, "explanation", "because")) is None
    # An extra option does not widen the label space learnt from the formatting example.
    assert reason(v, with_(with_(MC, "options.E", "Pluto"), "answer", "E")) is RejectReason.label_out_of_space
    assert reason(v, without(MC, "options.A")) is RejectReason.structure_mismatch


def test_max_field_chars_is_configurable() -> None:
    v = ExampleValidator(MC, max_field_chars=10)
    assert reason(v, with_(MC, "question", "x" * 11)) is RejectReason.field_too_long
    assert v.validate(with_(MC, "question", "x" * 10)) is None


# -- validator: NLI, boolean, lists ------------------------------------------------------------------


def test_nli_needs_an_explicit_label_space() -> None:
    unlabelled = ExampleValidator(NLI)
    assert unlabelled.label_field is None
    assert unlabelled.validate(with_(NLI, "label", 7)) is None  # nothing to check against
    v = ExampleValidator(NLI, label_field="label", label_space=[0, 1, 2])
    for label in (0, 1, 2):
        assert v.validate(with_(NLI, "label", label)) is None
    assert reason(v, with_(NLI, "label", 3)) is RejectReason.label_out_of_space
    assert reason(v, with_(NLI, "label", -1)) is RejectReason.label_out_of_space
    assert reason(v, with_(NLI, "label", True)) is RejectReason.structure_mismatch  # bool is not int
    assert reason(v, with_(NLI, "label", "1")) is RejectReason.structure_mismatch
    assert reason(v, with_(NLI, "label", 1.5)) is RejectReason.structure_mismatch


def test_string_label_space() -> None:
    example = {"premise": "p", "hypothesis": "h", "label": "entailment"}
    v = ExampleValidator(example, label_field="label", label_space=["entailment", "neutral", "contradiction"])
    assert v.validate(with_(example, "label", "neutral")) is None
    assert reason(v, with_(example, "label", "maybe")) is RejectReason.label_out_of_space


def test_boolean_label_inferred() -> None:
    v = ExampleValidator(BOOLQ)
    assert v.label_space == [True, False]
    assert v.validate(with_(BOOLQ, "answer", False)) is None
    assert reason(v, with_(BOOLQ, "answer", "yes")) is RejectReason.structure_mismatch
    assert reason(v, with_(BOOLQ, "answer", 1)) is RejectReason.structure_mismatch


def test_options_list_with_answer_item_or_index() -> None:
    by_item = ExampleValidator({"q": "colour of sky", "options": ["red", "blue"], "answer": "blue"})
    assert by_item.validate({"q": "grass", "options": ["green", "pink"], "answer": "green"}) is None
    assert reason(by_item, {"q": "grass", "options": ["green", "pink"], "answer": "blue"}) is RejectReason.label_out_of_space
    by_index = ExampleValidator({"q": "colour of sky", "options": ["red", "blue", "green"], "answer": 1})
    assert by_index.validate({"q": "grass", "options": ["green", "pink", "grey"], "answer": 0}) is None
    assert reason(by_index, {"q": "grass", "options": ["green", "pink", "grey"], "answer": 3}) is RejectReason.label_out_of_space
    # Fewer options than the formatting example: the index must still point at one of them.
    assert reason(by_index, {"q": "grass", "options": ["green", "pink"], "answer": 2}) is RejectReason.label_out_of_space


def test_nested_lists_and_dicts() -> None:
    v = ExampleValidator(NESTED)
    assert v.label_field == "sample.label"
    assert v.validate(NESTED) is None
    assert v.validate(with_(NESTED, "scores", [1, 2.5, 0])) is None  # int where float expected
    assert v.validate(with_(NESTED, "scores", [])) is None
    assert v.validate(with_(NESTED, "dialog", [{"speaker": "a", "text": "b"}] * 3)) is None
    verdict = v.validate(with_(NESTED, "scores", [0.5, "high"]))
    assert verdict.reason is RejectReason.structure_mismatch and verdict.detail.startswith("scores[1]:")
    verdict = v.validate(with_(NESTED, "scores", [0.5, True]))
    assert verdict.reason is RejectReason.structure_mismatch
    verdict = v.validate(with_(NESTED, "dialog.1", {"speaker": "bot"}))
    assert verdict.reason is RejectReason.structure_mismatch and verdict.detail.startswith("dialog[1]:")
    verdict = v.validate(with_(NESTED, "dialog.0.text", " "))
    assert verdict.reason is RejectReason.empty_field and verdict.detail.startswith("dialog[0].text:")
    assert reason(v, with_(NESTED, "meta.tags", "greeting")) is RejectReason.structure_mismatch
    assert reason(v, with_(NESTED, "meta.turns", 2.0)) is RejectReason.structure_mismatch
    assert reason(v, with_(NESTED, "sample.label", None)) is RejectReason.structure_mismatch


def test_from_schema_matches_the_formatting_example_validator() -> None:
    schema = example_schema(MC, "answer", ["A", "B", "C", "D"])
    v = ExampleValidator.from_schema(schema, "answer")
    assert v.label_space == ["A", "B", "C", "D"]
    assert v.validate(MC) is None
    assert reason(v, with_(MC, "answer", "E")) is RejectReason.label_out_of_space
    assert reason(v, with_(MC, "options.E", "x")) is RejectReason.structure_mismatch
    loose = ExampleValidator.from_schema(schema, "answer", allow_extra_keys=True)
    assert loose.validate(with_(MC, "note", "x")) is None


# -- agreement with jsonschema on random items -----------------------------------------------------

json_leaf = st.one_of(st.text(alphabet="abc xyz", min_size=0, max_size=6), st.integers(-3, 3),
                      st.floats(-2, 2, allow_nan=False).filter(lambda f: not f.is_integer()), st.booleans(), st.none())


def mutate(draw: st.DrawFn, value: Any) -> Any:
    choice = draw(st.integers(0, 5))
    if isinstance(value, dict):
        value = dict(value)
        if choice == 0 and value:
            del value[draw(st.sampled_from(sorted(value)))]
        elif choice == 1:
            value[draw(st.sampled_from(["zz", "A", "label"]))] = draw(json_leaf)
        elif value:
            key = draw(st.sampled_from(sorted(value)))
            value[key] = mutate(draw, value[key])
        return value
    if isinstance(value, list):
        if choice == 0:
            return draw(json_leaf)
        return [mutate(draw, v) if draw(st.booleans()) else v for v in value] + ([draw(json_leaf)] if choice == 1 else [])
    return draw(json_leaf) if choice < 3 else value


@st.composite
def mutated(draw: st.DrawFn, base: dict) -> Any:
    item = base
    for _ in range(draw(st.integers(0, 3))):
        item = mutate(draw, item)
    return item


@pytest.mark.parametrize("base,field,space", [(MC, "answer", ["A", "B", "C", "D"]), (NESTED, "sample.label", [True, False]),
                                               (NLI, "label", [0, 1, 2])])
def test_agrees_with_jsonschema(base: dict, field: str, space: list) -> None:
    schema = example_schema(base, field, space)
    validator = ExampleValidator(base, field, space)
    checker = jsonschema.Draft202012Validator(schema)

    @settings(max_examples=300, deadline=None)
    @given(mutated(base))
    def check(item: Any) -> None:
        # Whitespace-only strings pass minLength but are empty fields here.
        def blank(value: Any) -> bool:
            if isinstance(value, str):
                return value != "" and value.isspace()
            if isinstance(value, dict):
                return any(blank(v) for v in value.values())
            if isinstance(value, list):
                return any(blank(v) for v in value)
            return False

        if blank(item):
            return
        assert (validator.validate(item) is None) == checker.is_valid(item), (item, validator.validate(item))

    check()


# -- invisible text and label paths through lists ---------------------------------------------


@pytest.mark.parametrize("blank", ["\u200b", "\u2800", "\u200b\u200c\u200d\u2060", "\ufeff ", " \u2800\u3164 ", "\u202e"])
def test_invisible_text_is_empty(blank: str) -> None:
    # Before: "\u200b" and "\u2800" passed as non-empty strings.
    validator = ExampleValidator({"text": "hello", "label": "positive"}, "label", ["positive", "negative"])
    verdict = validator.validate({"text": blank, "label": "positive"})
    assert verdict is not None and verdict.reason is RejectReason.empty_field
    assert validator.validate({"text": "h\u200bi", "label": "positive"}) is None


def test_label_path_steps_through_lists() -> None:
    # Before: `_check_label` could not index a list and rejected every item as "missing".
    seed = {"turns": [{"speaker": "user", "text": "hi"}, {"speaker": "bot", "text": "hello"}]}
    validator = ExampleValidator(seed, "turns.0.speaker", ["user", "bot"])
    good = {"turns": [{"speaker": "bot", "text": "yo"}, {"speaker": "user", "text": "hey"}]}
    assert validator.validate(good) is None
    bad = {"turns": [{"speaker": "cat", "text": "meow"}]}
    assert validator.validate(bad).reason is RejectReason.label_out_of_space
    assert "missing" in validator.validate({"turns": []}).detail

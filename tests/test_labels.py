"""The label plan: per-item target labels, their balance, determinism and restart, the per-position
schema (and llama.cpp's grammar of it), label-aware self-reference, and the simulator following it."""

from __future__ import annotations

import json
import random
from collections import Counter

import orjson
import pytest

from datacreator.contracts import AcceptedRef, Candidate, CreationRequest, GenerationTask, Strategy, TaskOutcome
from datacreator.logic.curation import RequestCuration
from datacreator.logic.labels import LabelPlan, integer_targets, label_text
from datacreator.logic.planning import PlannerLimits, RequestPlan, RequestRejected, validate_request
from datacreator.logic.prompt import build_messages, response_format
from datacreator.logic.shape import batch_schema, example_schema, ordered_like
from datacreator.logic.strategies import derive_rng
from datacreator.simulator.generate import Faults, write_examples
from tests.helpers import make_task

MCQ = {"question": "Where do fish live?", "options": {"A": "trees", "B": "water", "C": "sky", "D": "sand"}, "answer": "B"}
NEWS = {"headline": "Vaccine trial ends early", "topic": "health"}
TOPICS = ["business", "health", "sports", "tech", "world"]
BOOL = {"question": "Is the sky green?", "answer": False}
NLI = {"premise": "A man sleeps.", "hypothesis": "A man is awake.", "label": 2}


def request(**overrides) -> CreationRequest:
    fields = dict(request_id="req-l", instruction="Write multiple-choice questions.", formatting_example=MCQ,
                  target_count=100, examples_per_call=5, strategy=Strategy.random, chains=4)
    fields.update(overrides)
    return CreationRequest(**fields)


def answer(task: GenerationTask, keep: float, rng: random.Random, field: str, follow: bool = True) -> TaskOutcome:
    """An outcome whose accepted items carry their planned label (a model held to the schema),
    with a share `keep` of items surviving curation."""
    accepted = []
    for i, label in enumerate(task.planned_labels or [None] * task.num_examples):
        if rng.random() >= keep:
            continue
        data = json.loads(json.dumps(task.references[0].data))
        data["question" if "question" in data else next(iter(data))] = f"{task.task_id} {i}"
        data[field] = label if follow and label is not None else task.references[0].data[field]
        accepted.append(AcceptedRef(example_id=f"{task.task_id}-{i}", data=data))
    return TaskOutcome(task_id=task.task_id, request_id=task.request_id, chain=task.chain, step=task.step,
                       references=task.references, accepted=accepted, model="sim-model")


def run(plan: RequestPlan, keep: float = 0.8, seed: int = 0, rounds: int = 2000, tasks: list | None = None) -> Counter:
    """Drive a plan to its end, answering the oldest task first; the accepted labels' counts."""
    rng = random.Random(seed)
    queue = list(tasks) if tasks is not None else plan.next_tasks(0.0)
    field = plan.status(0.0).label_field
    counts: Counter = Counter()
    t = 0.0
    while queue and not plan.finished and rounds:
        rounds -= 1
        task = queue.pop(0)
        outcome = answer(task, keep, rng, field)
        room = plan.request.target_count - plan.counts.accepted
        outcome.accepted = outcome.accepted[:room]  # the curator publishes exactly target_count
        counts.update(label_text(a.data[field]) for a in outcome.accepted)
        t += 1.0
        plan.on_outcome(outcome, t)
        queue += plan.next_tasks(t)
    return counts


# ---------------------------------------------------------------------------------------------
# Planning


@pytest.mark.parametrize(
    ("seed_example", "overrides", "labels"),
    [
        (MCQ, {}, ["A", "B", "C", "D"]),
        (NEWS, {"label_field": "topic", "label_space": TOPICS}, TOPICS),
        (BOOL, {}, ["true", "false"]),
        (NLI, {"label_field": "label", "label_space": [0, 1, 2]}, ["0", "1", "2"]),
    ],
    ids=["mcq-letters", "explicit-space", "boolean", "integer"],
)
def test_uniform_plan_ends_on_the_target_of_every_label(seed_example, overrides, labels) -> None:
    plan = RequestPlan.start(request(formatting_example=seed_example, target_count=137, **overrides), 0.0)
    counts = run(plan, keep=0.7)
    status = plan.status(1.0)
    assert status.state.value == "COMPLETED" and status.accepted == 137
    assert sorted(status.label_targets) == sorted(labels)
    assert status.label_counts == dict(counts)
    for label in labels:
        assert abs(counts[label] - 137 / len(labels)) <= 1, counts
    assert status.label_counts == status.label_targets  # every item followed its plan: exact


def test_explicit_distribution_is_followed_and_shares_are_normalised() -> None:
    distribution = {"business": 6, "health": 2, "sports": 1, "tech": 1, "world": 0}
    plan = RequestPlan.start(request(formatting_example=NEWS, label_field="topic", label_space=TOPICS, label_distribution=distribution,
                                     target_count=200), 0.0)
    counts = run(plan, keep=0.6, seed=3)
    assert dict(counts) == {"business": 120, "health": 40, "sports": 20, "tech": 20}
    assert plan.status(1.0).label_targets == {"business": 120, "health": 40, "sports": 20, "tech": 20, "world": 0}


def test_one_call_carries_different_labels_where_the_space_allows() -> None:
    plan = RequestPlan.start(request(formatting_example=NEWS, label_field="topic", label_space=TOPICS, chains=1), 0.0)
    (task,) = plan.next_tasks(0.0)
    assert sorted(task.planned_labels) == TOPICS and task.num_examples == 5
    wide = RequestPlan.start(request(examples_per_call=10, chains=1), 0.0).next_tasks(0.0)[0]
    assert sorted(Counter(wide.planned_labels).values()) == [2, 2, 3, 3]  # 10 over 4 letters: as even as can be


def test_later_calls_plan_the_labels_still_missing() -> None:
    plan = RequestPlan.start(request(formatting_example=NEWS, label_field="topic", label_space=TOPICS, chains=1, target_count=10), 0.0)
    (first,) = plan.next_tasks(0.0)
    # Only the sports and tech items of the first call survive curation.
    kept = [AcceptedRef(example_id=f"e{i}", data={"headline": f"h{i}", "topic": t})
            for i, t in enumerate(first.planned_labels) if t in ("sports", "tech")]
    plan.on_outcome(TaskOutcome(task_id=first.task_id, request_id="req-l", chain=0, step=0,
                                references=first.references, accepted=kept), 1.0)
    (second,) = plan.next_tasks(1.0)
    assert sorted(second.planned_labels) == TOPICS  # still one of each
    # The three labels that came out empty lead the call.
    assert set(second.planned_labels[:3]) == {"business", "health", "world"}


def test_the_last_calls_ask_only_for_what_is_missing() -> None:
    plan = RequestPlan.start(request(formatting_example=NEWS, label_field="topic", label_space=TOPICS, chains=1, target_count=7), 0.0)
    (first,) = plan.next_tasks(0.0)
    assert first.num_examples == 5
    plan.on_outcome(answer(first, 1.0, random.Random(0), "topic"), 1.0)
    (second,) = plan.next_tasks(1.0)
    # Targets 2, 2, 1, 1, 1 (largest remainder, ties to the earlier label): two items are missing.
    assert sorted(second.planned_labels) == ["business", "health"]
    assert plan.next_tasks(1.0) == []  # nothing else is missing, so no other call goes out


def test_plan_is_deterministic_and_survives_a_restart() -> None:
    def drive(plan: RequestPlan, tasks: list, steps: int, seed: int) -> list:
        rng, queue, out = random.Random(seed), list(tasks), []
        for step in range(steps):
            task = queue.pop(0)
            plan.on_outcome(answer(task, 0.6, rng, "answer"), float(step + 1))
            new = plan.next_tasks(float(step + 1))
            queue += new
            out.append([(t.task_id, t.planned_labels, t.references[0].example_id) for t in new])
        return out

    a = RequestPlan.start(request(target_count=300), 0.0)
    b = RequestPlan.start(request(target_count=300), 0.0)
    assert drive(a, a.next_tasks(0.0), 10, 1) == drive(b, b.next_tasks(0.0), 10, 1)

    restored = RequestPlan.restore(json.loads(orjson.dumps(a.snapshot())))
    assert [t.model_dump() for t in restored.in_flight_tasks()] == [t.model_dump() for t in a.in_flight_tasks()]
    assert drive(restored, restored.in_flight_tasks(), 15, 2) == drive(a, a.in_flight_tasks(), 15, 2)
    assert restored.status(9.0) == a.status(9.0)


def test_a_version_1_snapshot_resumes_with_the_plan_off() -> None:
    plan = RequestPlan.start(request(label_plan="off"), 0.0)
    plan.next_tasks(0.0)
    old = plan.snapshot()
    old["version"] = 1
    for key in ("label_field", "label_space", "example_schema", "labels", "labels_seen", "model"):
        old.pop(key)
    for entry in old["in_flight"].values():
        entry.pop("labels")
    restored = RequestPlan.restore(old)
    assert [t.model_dump() for t in restored.in_flight_tasks()] == [t.model_dump() for t in plan.in_flight_tasks()]


def test_plan_off_is_todays_behaviour() -> None:
    plan = RequestPlan.start(request(label_plan="off"), 0.0)
    tasks = plan.next_tasks(0.0)
    assert all(t.planned_labels is None and t.num_examples == 5 for t in tasks)
    assert plan.status(0.0).label_targets is None
    counts = run(plan, keep=1.0, tasks=tasks)
    assert plan.status(1.0).label_counts == {"B": 100} == dict(counts)  # the answer stays the seed's


def test_no_plan_without_a_label_space() -> None:
    free = {"question": "What do bees make?", "answer": "honey"}
    (task, *_) = RequestPlan.start(request(formatting_example=free), 0.0).next_tasks(0.0)
    assert task.planned_labels is None and task.label_space is None


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"label_distribution": {"E": 1.0}}, "not in the label space: ['E']"),
        ({"label_distribution": {"A": 0.0}}, "sum to 0"),
        ({"label_distribution": {"A": 1.0}, "label_plan": "off"}, "needs label_plan"),
        ({"formatting_example": {"question": "q", "answer": "honey"}, "label_distribution": {"honey": 1.0}}, "known label space"),
        ({"formatting_example": NEWS, "label_field": "topic", "label_space": ["tech", "tech", "health"]}, "same label twice"),
    ],
)
def test_bad_label_settings_are_rejected_with_a_reason(overrides, needle) -> None:
    with pytest.raises(RequestRejected) as rejected:
        validate_request(request(**overrides), None, PlannerLimits())
    assert needle in str(rejected.value)


def test_integer_targets_sum_to_the_total_within_one_of_each_share() -> None:
    for total in (1, 7, 100, 137, 1000):
        shares = [0.5, 0.3, 0.2 / 3, 0.2 / 3, 0.2 / 3]
        counts = integer_targets(shares, total)
        assert sum(counts) == total
        assert all(abs(c - s * total) < 1 for c, s in zip(counts, shares))


def test_label_aware_self_reference_picks_an_example_of_the_planned_label() -> None:
    plan = RequestPlan.start(request(chains=1, target_count=50), 0.0)
    (first,) = plan.next_tasks(0.0)
    plan.on_outcome(answer(first, 1.0, random.Random(0), "answer"), 1.0)
    (second,) = plan.next_tasks(1.0)
    reference = second.references[0]
    assert reference.example_id is not None  # drawn from the previous call, as random does
    assert reference.data["answer"] == second.planned_labels[0]
    # Many calls later the formatting examples' labels are spread, not stuck on the seed's "B".
    seen = Counter()
    rng = random.Random(5)
    task = second
    for step in range(12):
        plan.on_outcome(answer(task, 1.0, rng, "answer"), 2.0 + step)
        (task,) = plan.next_tasks(2.0 + step) or (None,)
        if task is None:
            break
        seen[task.references[0].data["answer"]] += 1
    assert len(seen) >= 3


# ---------------------------------------------------------------------------------------------
# Schema, prompt, grammar, curation, simulator


def planned_task(labels: list, seed_example: dict = MCQ, field: str = "answer", space: list | None = None) -> GenerationTask:
    space = space or ["A", "B", "C", "D"]
    return make_task("t1", request_id="req-l", seed=seed_example, instruction="Write multiple-choice questions.",
                     num_examples=len(labels), example_schema=example_schema(seed_example, field, space), label_field=field,
                     label_space=space, planned_labels=labels)


def test_per_position_schema_pins_each_label_and_puts_it_first() -> None:
    item = example_schema({"meta": {"text": "t", "gold": "yes"}, "id": 1}, "meta.gold", ["yes", "no"])
    before = json.loads(json.dumps(item))
    schema = batch_schema(item, 2, "meta.gold", ["no", "yes"])
    array = schema["properties"]["examples"]
    assert "items" not in array and array["minItems"] == array["maxItems"] == 2
    for position, label in zip(array["prefixItems"], ["no", "yes"]):
        assert list(position["properties"]) == ["meta", "id"] and position["required"][0] == "meta"
        meta = position["properties"]["meta"]
        assert list(meta["properties"]) == ["gold", "text"] and meta["required"] == ["gold", "text"]
        assert meta["properties"]["gold"] == {"type": "string", "const": label}
    assert list(item["properties"]["meta"]["properties"]) == ["text", "gold"]  # the task's own schema is untouched
    assert item == before and item["properties"]["meta"]["required"] == before["properties"]["meta"]["required"]


def test_llama_cpp_grammar_pins_the_label_of_every_position_before_the_content() -> None:
    llama_grammar = pytest.importorskip("llama_cpp.llama_grammar")
    cases = [(MCQ, "answer", ["A", "B", "C", "D"], ["C", "A", "D"]), (BOOL, "answer", [True, False], [True, False]),
             (NLI, "label", [0, 1, 2], [2, 0, 1])]
    for seed, field, space, labels in cases:
        schema = batch_schema(example_schema(seed, field, space), len(labels), field, labels)
        grammar = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
        rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
        assert rules["examples"] == '"[" space ' + ' "," space '.join(f"examples-tuple-{i}" for i in range(len(labels))) + ' "]" space'
        for i, label in enumerate(labels):
            # The label's key is the first the grammar lets the model write, and only one value is allowed.
            assert rules[f"examples-tuple-{i}"].startswith(f'"{{" space examples-tuple-{i}-{field}-kv ')
            assert rules[f"examples-tuple-{i}-{field}"] == json.dumps(json.dumps(label))
        llama_grammar.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)  # llama.cpp parses it


def test_prompt_names_each_items_label_and_asks_for_clear_examples() -> None:
    task = planned_task(["C", "A", "D"])
    text = build_messages(task)[1]["content"]
    assert 'The "answer" of the 3 examples, in order: "C", "A", "D".' in text
    assert 'must clearly belong to the task and truly be an example of its "answer"' in text
    schema = response_format(task, "json_schema")["json_schema"]["schema"]
    assert [p["properties"]["answer"]["const"] for p in schema["properties"]["examples"]["prefixItems"]] == ["C", "A", "D"]


def test_prompt_with_the_plan_off_asks_for_all_different_answers() -> None:
    off = planned_task(["A"] * 3).model_copy(update={"planned_labels": None})
    assert 'The examples must all have different "answer" values.' in build_messages(off)[1]["content"]
    many = off.model_copy(update={"num_examples": 6})
    assert 'Use every "answer" value, each about equally often.' in build_messages(many)[1]["content"]
    schema = response_format(off, "json_schema")["json_schema"]["schema"]["properties"]["examples"]
    assert schema["items"]["properties"]["answer"]["enum"] == ["A", "B", "C", "D"]


@pytest.mark.parametrize("mode", ["json_schema", "json_object"])
def test_simulator_writes_the_label_each_position_asks_for(mode) -> None:
    labels = ["D", "A", "C", "B", "D", "A"]
    task = planned_task(labels)
    for seed in range(5):
        raw = write_examples(random.Random(seed), build_messages(task), response_format(task, mode), Faults())
        items = orjson.loads(raw)["examples"]
        assert [item["answer"] for item in items] == labels
        assert all(item["answer"] in item["options"] for item in items)


def test_curation_restores_the_formatting_examples_key_order() -> None:
    task = planned_task(["C", "A"])
    raw = write_examples(random.Random(1), build_messages(task), response_format(task, "json_schema"), Faults())
    assert [list(item) for item in orjson.loads(raw)["examples"]] == [["answer", "question", "options"]] * 2
    result = RequestCuration.for_task(task).curate(Candidate(task=task, endpoint="default", model="sim", raw_output=raw))
    assert [list(e.data) for e in result.examples] == [["question", "options", "answer"]] * 2
    assert [e.data["answer"] for e in result.examples] == ["C", "A"]
    assert result.outcome.model == "sim"
    nested = {"b": {"y": 1, "x": [{"q": 1, "p": 2}]}, "a": 0}
    schema = example_schema({"a": 0, "b": {"x": [{"p": 2, "q": 1}], "y": 1}})
    assert json.dumps(ordered_like(nested, schema)) == '{"a": 0, "b": {"x": [{"p": 2, "q": 1}], "y": 1}}'


def test_label_plan_survives_json_round_trip_of_the_status() -> None:
    plan = RequestPlan.start(request(model={"name": None, "temperature": 0.7, "top_p": 0.9}), 0.0)
    run(plan)
    status = plan.status(1.0)
    assert (status.model, status.temperature, status.top_p) == ("sim-model", 0.7, 0.9)
    assert status.label_field == "answer" and sum(status.label_counts.values()) == 100


def test_derive_rng_is_what_seeds_label_ties() -> None:
    lp = LabelPlan.create("answer", ["A", "B", "C", "D"], None, 8)
    picks = {tuple(lp.plan_call(2, [], derive_rng("r", "labels", i))) for i in range(20)}
    assert len(picks) > 1  # ties go different ways at different steps
    assert lp.plan_call(2, [], derive_rng("r", "labels", 3)) == lp.plan_call(2, [], derive_rng("r", "labels", 3))


def test_export_manifest_records_model_sampling_and_labels(tmp_path) -> None:
    from datacreator.contracts import Example
    from datacreator.export import write_export

    req = request(target_count=8, model={"temperature": 1.0, "top_p": 0.0})
    plan = RequestPlan.start(req, 0.0)
    run(plan, keep=1.0)
    status = plan.status(1.0)
    examples = [Example(example_id=f"e{i}", request_id="req-l", data={**MCQ, "question": f"q{i}", "answer": "ABCD"[i % 4]},
                        strategy=Strategy.random, reference_ids=[None], task_id="t", chain=0, step=0, model="sim-model")
                for i in range(8)]
    manifest = orjson.loads(write_export(examples, tmp_path / "out.jsonl", request_id="req-l", status=status, request=req).read_bytes())
    assert manifest["model"] == "sim-model"
    assert manifest["sampling"] == {"temperature": 1.0, "top_p": 0.0, "max_tokens": 2048}
    assert manifest["label_field"] == "answer"
    assert manifest["labels"] == {"plan": "on", "distribution": None, "exported": dict.fromkeys("ABCD", 2),
                                  "targets": dict.fromkeys("ABCD", 2)}

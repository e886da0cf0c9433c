"""RequestCuration: the curator's rules, redelivery and restart safety."""

from __future__ import annotations

import json

import pytest

from datacreator.contracts import (
    Candidate,
    DedupSpec,
    Example,
    Reference,
    RejectReason,
    Strategy,
)
from datacreator.logic.curation import CuratorState, RequestCuration
from datacreator.logic.dedup import example_id
from datacreator.logic.shape import example_schema
from tests.helpers import SEED, candidate, item, make_task


def test_accepts_valid_items_and_builds_examples() -> None:
    task = make_task()
    curation = RequestCuration.for_task(task)
    result = curation.curate(candidate(task, [item(1), item(2, "C")]))
    assert [e.data for e in result.examples] == [item(1), item(2, "C")]
    first = result.examples[0]
    assert first.example_id == example_id("req-1", item(1))
    assert (first.request_id, first.task_id, first.chain, first.step, first.model) == ("req-1", "t-0", 0, 0, "sim-1")
    assert first.reference_ids == [None] and first.strategy is Strategy.random
    outcome = result.outcome
    assert [(a.example_id, a.data) for a in outcome.accepted] == [(e.example_id, e.data) for e in result.examples]
    assert outcome.rejected == {} and outcome.error is None and not outcome.target_reached
    assert (outcome.usage.total_tokens, outcome.cost_usd, outcome.latency_s) == (150, 0.001, 0.5)
    assert outcome.references == task.references
    assert curation.accepted_count == 2 and curation.state_size() == 2


def test_rejections_by_reason() -> None:
    task = make_task()
    curation = RequestCuration.for_task(task)
    ok = item(1)
    raw = json.dumps([ok, {**item(2), "answer": "E"}, {**item(3), "question": " "}, {"question": "x"}, SEED,
                      {**ok, "question": ok["question"].upper()}])[:-1] + ', {"question": "cut'
    result = curation.curate(candidate(task, raw=raw))
    assert [e.data for e in result.examples] == [ok]
    assert result.outcome.rejected == {"label_out_of_space": 1, "empty_field": 1, "structure_mismatch": 1,
                                       "copy_of_reference": 1, "duplicate": 1, "unparseable": 1}
    unparseable = [r for r in result.rejections if r.reason is RejectReason.unparseable]
    assert unparseable[0].raw.startswith('{"question": "cut') and unparseable[0].item is None
    label = [r for r in result.rejections if r.reason is RejectReason.label_out_of_space][0]
    assert label.item["answer"] == "E" and "answer" in label.detail
    assert all(r.request_id == "req-1" and r.task_id == "t-0" for r in result.rejections)


def test_copy_of_any_reference_is_rejected() -> None:
    refs = [Reference(example_id="e-1", data=item(10)), Reference(example_id="e-2", data=item(11))]
    task = make_task(references=refs)
    result = RequestCuration.for_task(task).curate(candidate(task, [item(11), item(12)]))
    assert [r.reason for r in result.rejections] == [RejectReason.copy_of_reference]
    assert result.examples[0].reference_ids == ["e-1", "e-2"]


def test_llm_error() -> None:
    task = make_task()
    curation = RequestCuration.for_task(task)
    result = curation.curate(candidate(task, error="endpoint returned 503 six times"))
    assert result.examples == []
    assert [r.reason for r in result.rejections] == [RejectReason.llm_error]
    assert result.outcome.error == "endpoint returned 503 six times"
    assert result.outcome.rejected == {"llm_error": 1}
    assert result.outcome.accepted == []


def test_raw_text_is_truncated() -> None:
    task = make_task()
    curation = RequestCuration.for_task(task, raw_text_limit=50)
    result = curation.curate(candidate(task, raw="no json here " * 100))
    assert result.rejections[0].reason is RejectReason.unparseable
    assert len(result.rejections[0].raw) == 50


def test_surplus_after_target() -> None:
    task = make_task(target=3)
    curation = RequestCuration.for_task(task)
    first = curation.curate(candidate(task, [item(1), item(2)]))
    assert len(first.examples) == 2 and not first.outcome.target_reached
    task2 = make_task("t-1", target=3)
    second = curation.curate(candidate(task2, [item(3), item(4), item(5), item(1)]))
    assert [e.data for e in second.examples] == [item(3)]
    assert second.outcome.rejected == {"surplus": 2, "duplicate": 1}
    assert second.outcome.target_reached
    assert curation.accepted_count == 3


def test_near_duplicates_across_tasks_and_dedup_settings_from_task() -> None:
    task = make_task(dedup=DedupSpec(near_duplicate_threshold=0.7))
    curation = RequestCuration.for_task(task)
    curation.curate(candidate(task, [item(1)]))
    near = {**item(1), "question": item(1)["question"] + " Choose one."}
    result = curation.curate(candidate(make_task("t-1"), [near]))
    assert result.outcome.rejected == {"near_duplicate": 1}
    loose_task = make_task(dedup=DedupSpec(near_duplicate_threshold=None))
    loose = RequestCuration.for_task(loose_task)
    loose.curate(candidate(loose_task, [item(1)]))
    assert len(loose.curate(candidate(make_task("t-1"), [near])).examples) == 1


def test_redelivery_yields_same_outcome_and_no_new_example() -> None:
    task = make_task(target=4)
    curation = RequestCuration.for_task(task)
    items = [item(1), item(2), item(2), item(3, "E"), item(4), item(5), item(6)]
    cand = candidate(task, items)
    first = curation.curate(cand)
    assert len(first.examples) == 4
    again = curation.curate(cand)
    assert again.examples == []
    assert again.redelivered == 4
    assert again.outcome.accepted == first.outcome.accepted
    assert again.outcome.rejected == first.outcome.rejected == {"duplicate": 1, "label_out_of_space": 1, "surplus": 1}
    assert again.outcome.target_reached and curation.accepted_count == 4


def test_same_items_from_another_task_are_duplicates() -> None:
    curation = RequestCuration.for_task(make_task())
    curation.curate(candidate(make_task("t-0"), [item(1)]))
    other = curation.curate(candidate(make_task("t-9"), [item(1)]))
    assert other.examples == [] and other.outcome.accepted == []
    assert other.outcome.rejected == {"duplicate": 1}


def test_restore_then_recurate_gives_no_duplicates() -> None:
    tasks = [make_task(f"t-{i}", target=6) for i in range(3)]
    batches = [[item(1), item(2)], [item(3), item(4)], [item(5), item(6), item(7)]]
    live = RequestCuration.for_task(tasks[0])
    published: list[Example] = []
    outcomes = []
    for task, batch in zip(tasks, batches):
        result = live.curate(candidate(task, batch))
        published += result.examples
        outcomes.append(result.outcome)
    assert len(published) == 6

    # A restarted curator reads the examples topic back, then the last two candidates come again.
    restarted = RequestCuration.for_task(tasks[1])
    for example in published:
        restarted.restore(example)
    restarted.restore(published[0])  # read twice: no double count
    assert restarted.accepted_count == 6 and restarted.state_size() == 6
    for i in (1, 2):
        result = restarted.curate(candidate(tasks[i], batches[i]))
        assert result.examples == []
        assert result.outcome.accepted == outcomes[i].accepted
        assert result.outcome.rejected == outcomes[i].rejected
    # New content is still judged as usual; copies of restored examples are duplicates.
    fresh = restarted.curate(candidate(make_task("t-3", target=6), [item(2), item(8)]))
    assert fresh.examples == []
    assert fresh.outcome.rejected == {"duplicate": 1, "surplus": 1}


def test_curator_state_restores_requests_seen_later() -> None:
    task = make_task(target=10)
    live = RequestCuration.for_task(task)
    published = live.curate(candidate(task, [item(1), item(2)])).examples
    state = CuratorState()
    for example in published:
        state.restore(example)
    assert state.state_size() == 0  # no task seen yet for that request
    result = state.curate(candidate(task, [item(1), item(2)]))
    assert result.examples == [] and result.redelivered == 2
    assert state.state_size() == 2
    other = make_task(request_id="req-2")
    assert len(state.curate(candidate(other, [item(1)])).examples) == 1  # requests are independent
    assert state.state_size() == 3
    state.forget("req-1")
    assert state.state_size() == 1


def test_extra_keys_follow_the_task() -> None:
    task = make_task(allow_extra_keys=True)
    task = task.model_copy(update={"example_schema": example_schema(SEED, "answer", ["A", "B", "C", "D"], allow_extra_keys=True)})
    curation = RequestCuration.for_task(task)
    result = curation.curate(candidate(task, [{**item(1), "explanation": "because"}]))
    assert len(result.examples) == 1
    strict = RequestCuration.for_task(make_task())
    assert strict.curate(candidate(make_task(), [{**item(1), "explanation": "because"}])).outcome.rejected == {
        "structure_mismatch": 1}


@pytest.mark.slow
def test_semantic_dedup_from_the_task_uses_the_shared_model() -> None:
    from datacreator.minilm import shared_embedder

    task = make_task(dedup=DedupSpec(semantic_threshold=0.9))
    with pytest.raises(ValueError, match="needs an embedder"):
        RequestCuration.for_task(task)
    curation = CuratorState(embedder_factory=shared_embedder).for_task(task)  # as the curator builds it
    spider = {"question": "How many legs does a spider have?", "options": {"A": "six", "B": "eight", "C": "ten", "D": "four"},
              "answer": "B"}
    paraphrase = {**spider, "question": "What is the number of legs on a spider?"}
    unrelated = {"question": "What is the boiling point of water at sea level?",
                 "options": {"A": "90 C", "B": "100 C", "C": "110 C", "D": "120 C"}, "answer": "B"}
    result = curation.curate(candidate(task, [spider, paraphrase, unrelated]))
    assert [e.data for e in result.examples] == [spider, unrelated]
    assert result.outcome.rejected == {"semantic_duplicate": 1}


def test_a_near_copy_of_the_formatting_example_is_a_copy_of_reference():
    seed = {
        "question": "Where would you most likely keep frozen peas when you get home from the shop?",
        "options": {"A": "In a bookshelf", "B": "In a freezer", "C": "In a garden shed", "D": "In a car glovebox"},
        "answer": "B",
    }
    near_copy = dict(seed, question=seed["question"].rstrip("?") + " today?")
    fresh = {
        "question": "Which tool would a carpenter use to drive nails into a wooden beam?",
        "options": {"A": "A hammer", "B": "A spoon", "C": "A towel", "D": "A pillow"},
        "answer": "A",
    }
    task = make_task("t-near", request_id="r-near", target=10, seed=seed, instruction="x", num_examples=2,
                     example_schema=example_schema(seed), label_field=None, label_space=None)
    curation = RequestCuration.for_task(task)
    result = curation.curate(Candidate(task=task, endpoint="default", model="m", raw_output=json.dumps({"examples": [near_copy, fresh]})))
    assert [e.data for e in result.examples] == [fresh]
    assert [r.reason for r in result.rejections] == [RejectReason.copy_of_reference]
    assert "near-copy" in result.rejections[0].detail

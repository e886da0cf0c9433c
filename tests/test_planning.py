"""The planner's request lifecycle, driven by simulated outcomes."""

from __future__ import annotations

import json
import random
from collections import deque

import numpy as np
import orjson
import pytest

from datacreator.contracts import (
    AcceptedRef,
    Budget,
    CreationRequest,
    DedupSpec,
    GenerationTask,
    ModelSpec,
    RequestState,
    Strategy,
    TaskOutcome,
    Usage,
)
from datacreator.logic.planning import (
    PlannerLimits,
    RequestPlan,
    RequestRejected,
    accepted_after,
    task_id_for,
    validate_request,
)
from datacreator.logic.shape import example_schema
from datacreator.logic.strategies import CachedEmbedder, derive_rng, shuffled

SEED = {"question": "Which is a fruit?", "options": {"A": "apple", "B": "brick"}, "answer": "A"}


def make_request(**overrides) -> CreationRequest:
    fields = dict(
        request_id="req-1",
        instruction="Write multiple-choice questions.",
        formatting_example=SEED,
        target_count=20,
        examples_per_call=5,
        strategy=Strategy.random,
        chains=3,
    )
    fields.update(overrides)
    return CreationRequest(**fields)


def example(tag: str) -> AcceptedRef:
    return AcceptedRef(example_id=f"ex-{tag}", data={"question": f"q {tag}", "options": {"A": "x", "B": "y"}, "answer": "B"})


def outcome(task: GenerationTask, accepted: int | list[AcceptedRef] = 0, rejected: dict[str, int] | None = None, **kw) -> TaskOutcome:
    if isinstance(accepted, int):
        accepted = [example(f"{task.task_id}-{i}") for i in range(accepted)]
    return TaskOutcome(
        task_id=task.task_id,
        request_id=task.request_id,
        chain=task.chain,
        step=task.step,
        references=task.references,
        accepted=accepted,
        rejected=rejected or {},
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# Tasks and chains


def test_first_tasks_fill_every_chain_with_the_seed() -> None:
    request = make_request(dedup=DedupSpec(near_duplicate_threshold=0.7), allow_extra_keys=True)
    plan = RequestPlan.start(request, now=100.0)
    assert plan.state is RequestState.ACCEPTED and plan.wants_tasks
    tasks = plan.next_tasks(100.0)
    assert [t.chain for t in tasks] == [0, 1, 2] and {t.step for t in tasks} == {0}
    assert [t.task_id for t in tasks] == [task_id_for("req-1", c, 0) for c in range(3)]
    assert len({t.task_id for t in tasks}) == 3 and all(len(t.task_id) == 32 for t in tasks)
    for task in tasks:
        assert task.references[0].example_id is None and task.references[0].data == SEED
        assert task.label_field == "answer" and task.label_space == ["A", "B"]
        assert task.example_schema == example_schema(SEED, "answer", ["A", "B"], True)
        assert task.num_examples == 5 and task.target_count == 20 and task.instruction == request.instruction
        assert task.dedup == request.dedup and task.allow_extra_keys is True
    assert plan.state is RequestState.RUNNING
    assert plan.in_flight == 3 and not plan.wants_tasks
    assert plan.next_tasks(100.1) == []


def test_max_tasks_bounds_one_round() -> None:
    plan = RequestPlan.start(make_request(chains=4), 0.0)
    assert len(plan.next_tasks(0.0, max_tasks=1)) == 1
    assert len(plan.next_tasks(0.0, max_tasks=10)) == 3


def test_random_draws_from_the_chains_previous_call() -> None:
    plan = RequestPlan.start(make_request(), 0.0)
    tasks = plan.next_tasks(0.0)
    made = [example(f"c0-{i}") for i in range(4)]
    plan.on_outcome(outcome(tasks[0], made), 1.0)
    plan.on_outcome(outcome(tasks[1], [example("other")]), 1.0)
    nxt = plan.next_tasks(1.0)
    by_chain = {t.chain: t for t in nxt}
    assert set(by_chain) == {0, 1}
    assert by_chain[0].step == 1 and by_chain[0].references[0].example_id in {m.example_id for m in made}
    assert by_chain[1].references[0].example_id == "ex-other"
    assert by_chain[0].task_id == task_id_for("req-1", 0, 1)
    # Same outcomes, same choice.
    twin = RequestPlan.start(make_request(), 0.0)
    twin_tasks = twin.next_tasks(0.0)
    twin.on_outcome(outcome(twin_tasks[0], made), 1.0)
    twin.on_outcome(outcome(twin_tasks[1], [example("other")]), 1.0)
    assert [t.references for t in twin.next_tasks(1.0)] == [t.references for t in nxt]


def test_random_choice_varies_across_steps_but_stays_in_the_batch() -> None:
    plan = RequestPlan.start(make_request(chains=1, target_count=10_000), 0.0)
    task = plan.next_tasks(0.0)[0]
    seen = set()
    for step in range(30):
        made = [example(f"s{step}-{i}") for i in range(5)]
        plan.on_outcome(outcome(task, made), float(step))
        task = plan.next_tasks(float(step))[0]
        assert task.step == step + 1
        assert task.references[0].example_id in {m.example_id for m in made}
        seen.add(task.references[0].example_id.rsplit("-", 1)[1])
    assert len(seen) > 2  # positions drawn at random, not always the same one


def fake_embed(vectors: dict[str, np.ndarray]) -> CachedEmbedder:
    class Table:
        def embed(self, texts):
            return np.stack([vectors[t.split(" ")[0]] for t in texts])

    return CachedEmbedder(Table())


def vec(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def tagged(tag: str) -> AcceptedRef:
    return AcceptedRef(example_id=f"ex-{tag}", data={"question": tag, "answer": "A"})


@pytest.mark.parametrize(("strategy", "first", "second"), [(Strategy.contrastive, "far", "back"), (Strategy.similar, "near", "near2")])
def test_embedding_strategies_follow_the_previous_formatting_example(strategy: Strategy, first: str, second: str) -> None:
    embed = fake_embed(
        {
            "Which": vec(1, 0, 0),  # the seed's text starts with its question
            "near": vec(0.9, 0.1, 0),
            "far": vec(0, 0, 1),
            "mid": vec(0.5, 0.5, 0),
            "near2": vec(0.85, 0.15, 0.0),  # close to "near"
            "back": vec(0.9, 0.0, -0.5),  # least similar to "far"
            "far2": vec(0, 0.1, 1),  # close to "far"
        }
    )
    plan = RequestPlan.start(make_request(chains=1, strategy=strategy, target_count=100), 0.0)
    task = plan.next_tasks(0.0, embed)[0]
    plan.on_outcome(outcome(task, [tagged("near"), tagged("far"), tagged("mid")]), 1.0)
    task = plan.next_tasks(1.0, embed)[0]
    assert task.references[0].example_id == f"ex-{first}"
    previous = first
    plan.on_outcome(outcome(task, [tagged("near2"), tagged("back"), tagged("far2")]), 2.0)
    task = plan.next_tasks(2.0, embed)[0]
    assert task.references[0].example_id == f"ex-{second}", f"anchor should be {previous}"


def test_embedding_strategy_without_embedder_is_an_error() -> None:
    plan = RequestPlan.start(make_request(chains=1, strategy=Strategy.similar), 0.0)
    task = plan.next_tasks(0.0)[0]
    plan.on_outcome(outcome(task, 2), 1.0)
    with pytest.raises(ValueError, match="embedding"):
        plan.next_tasks(1.0)


def test_none_always_uses_the_seed() -> None:
    plan = RequestPlan.start(make_request(chains=2, strategy=Strategy.none, target_count=100), 0.0)
    tasks = plan.next_tasks(0.0)
    for round_ in range(3):
        for task in tasks:
            plan.on_outcome(outcome(task, 2), float(round_))
        tasks = plan.next_tasks(float(round_))
        assert len(tasks) == 2
        assert all(t.references[0].example_id is None and t.references[0].data == SEED for t in tasks)
    assert plan.status(5.0).fallbacks == 0


def test_fallback_to_the_chains_last_good_formatting_example() -> None:
    plan = RequestPlan.start(make_request(chains=1, target_count=100), 0.0)
    t0 = plan.next_tasks(0.0)[0]
    plan.on_outcome(outcome(t0, [example("a")]), 1.0)
    t1 = plan.next_tasks(1.0)[0]
    assert t1.references[0].example_id == "ex-a"
    plan.on_outcome(outcome(t1, [example("b")]), 2.0)
    t2 = plan.next_tasks(2.0)[0]
    assert t2.references[0].example_id == "ex-b"
    # ex-b's call yields nothing: go back to ex-a, whose call did yield.
    plan.on_outcome(outcome(t2, 0, {"structure_mismatch": 5}), 3.0)
    t3 = plan.next_tasks(3.0)[0]
    assert t3.references[0].example_id == "ex-a" and t3.step == 3
    assert plan.status(3.0).fallbacks == 1
    # A failed call (no output at all) falls back the same way.
    plan.on_outcome(outcome(t3, 0, error="HTTP 503"), 4.0)
    t4 = plan.next_tasks(4.0)[0]
    assert t4.references[0].example_id == "ex-a"
    status = plan.status(4.0)
    assert status.fallbacks == 2 and status.failed_calls == 1 and status.llm_calls == 4


def test_seed_fallback_when_the_first_call_yields_nothing() -> None:
    plan = RequestPlan.start(make_request(chains=1), 0.0)
    t0 = plan.next_tasks(0.0)[0]
    plan.on_outcome(outcome(t0, 0, {"unparseable": 1}), 1.0)
    t1 = plan.next_tasks(1.0)[0]
    assert t1.references[0].example_id is None and t1.task_id != t0.task_id
    assert plan.status(1.0).fallbacks == 1


def test_all_accepted_pool_draws_across_chains() -> None:
    plan = RequestPlan.start(make_request(chains=2, reference_pool="all_accepted", target_count=100), 0.0)
    t0, t1 = plan.next_tasks(0.0)
    plan.on_outcome(outcome(t0, [example("from-chain-0")]), 1.0)
    plan.on_outcome(outcome(t1, 0, {"duplicate": 5}), 1.0)
    nxt = plan.next_tasks(1.0)
    # Chain 1 made nothing itself, yet draws chain 0's example instead of falling back.
    assert {t.chain: t.references[0].example_id for t in nxt} == {0: "ex-from-chain-0", 1: "ex-from-chain-0"}
    assert plan.status(1.0).fallbacks == 0


def test_all_accepted_pool_is_bounded() -> None:
    limits = PlannerLimits(pool_size=4)
    plan = RequestPlan.start(make_request(chains=1, reference_pool="all_accepted", target_count=1000), 0.0, limits)
    task = plan.next_tasks(0.0)[0]
    drawn = set()
    for step in range(20):
        plan.on_outcome(outcome(task, 5), float(step))
        task = plan.next_tasks(float(step))[0]
        drawn.add(task.references[0].example_id)
    assert len(plan.snapshot()["pool"]) == 4
    assert len(drawn) > 3


# ---------------------------------------------------------------------------------------------
# Tree


def test_tree_levels_shuffle_branching_and_lineage() -> None:
    request = make_request(strategy=Strategy.tree, chains=3, tree_branching=2, examples_per_call=4, target_count=1000)
    plan = RequestPlan.start(request, 0.0)
    root = plan.next_tasks(0.0)
    assert len(root) == 1 and root[0].step == 1 and root[0].references[0].example_id is None
    assert not plan.wants_tasks  # level 1 starts only when level 0 is complete
    made = [example(f"l1-{i}") for i in range(4)]
    plan.on_outcome(outcome(root[0], made), 1.0)

    level1 = plan.next_tasks(1.0)
    kept = [m.example_id for m in made[:2]]  # branching 2: the first two children
    expected = [r.example_id for r in shuffled([made[0], made[1]], derive_rng("req-1", "tree", 1))]
    assert [t.references[0].example_id for t in level1] == expected
    assert sorted(expected) == sorted(kept)
    assert [t.chain for t in level1] == [0, 1] and {t.step for t in level1} == {2}
    assert [t.task_id for t in level1] == [task_id_for("req-1", "tree", 1, i) for i in range(2)]

    children = {}
    for task in level1:
        kids = [example(f"{task.references[0].example_id}-k{i}") for i in range(3)]
        children[task.references[0].example_id] = kids
        plan.on_outcome(outcome(task, kids), 2.0)
    level2_nodes = [k for parent in (m.example_id for m in made[:2]) for k in children[parent][:2]]
    # Level 2 has four nodes (2 per parent) but at most `chains` calls fly at once.
    wave = plan.next_tasks(2.0)
    assert len(wave) == 3 and plan.in_flight == 3
    plan.on_outcome(outcome(wave[0], 1), 3.0)
    last = plan.next_tasks(3.0)
    assert len(last) == 1
    level2 = wave + last
    assert sorted(t.references[0].example_id for t in level2) == sorted(k.example_id for k in level2_nodes)
    assert {t.step for t in level2} == {3}
    # Each reference is an accepted child of a level-1 node: lineage by example id.
    assert all(any(t.references[0].example_id.startswith(f"ex-{p}-k") for p in kept) for t in level2)
    # Nothing more until the level is complete.
    for task in wave[1:]:
        assert plan.next_tasks(3.5) == []
        plan.on_outcome(outcome(task, 2), 4.0)
    assert plan.next_tasks(4.0) == []
    plan.on_outcome(outcome(last[0], 2), 5.0)
    level3 = plan.next_tasks(5.0)
    assert {t.step for t in level3} == {4} and len(level3) == 3


def test_tree_restarts_from_the_last_non_empty_level_when_it_dies_out() -> None:
    request = make_request(strategy=Strategy.tree, chains=4, tree_branching=5, target_count=1000)
    plan = RequestPlan.start(request, 0.0)
    root = plan.next_tasks(0.0)[0]
    made = [example(f"n{i}") for i in range(3)]
    plan.on_outcome(outcome(root, made), 1.0)
    level1 = plan.next_tasks(1.0)
    assert len(level1) == 3
    for task in level1:
        plan.on_outcome(outcome(task, 0, {"copy_of_reference": 5}), 2.0)
    again = plan.next_tasks(2.0)
    assert sorted(t.references[0].example_id for t in again) == sorted(m.example_id for m in made)
    assert {t.step for t in again} == {2}
    assert not {t.task_id for t in again} & {t.task_id for t in level1}  # a new expansion, new ids
    assert plan.status(2.0).fallbacks == 1


def test_tree_dying_at_the_seed_expands_the_seed_again() -> None:
    plan = RequestPlan.start(make_request(strategy=Strategy.tree, chains=2), 0.0)
    root = plan.next_tasks(0.0)[0]
    plan.on_outcome(outcome(root, 0, error="timeout"), 1.0)
    again = plan.next_tasks(1.0)
    assert len(again) == 1 and again[0].references[0].example_id is None and again[0].task_id != root.task_id
    assert plan.status(1.0).fallbacks == 1


# ---------------------------------------------------------------------------------------------
# Target, budget, stall, cancel


def curator(plan_accepted: int, target: int, task: GenerationTask, rng: random.Random, p_accept: float) -> TaskOutcome:
    """Accepts each of a call's examples with probability p, never past the target."""
    wanted = sum(rng.random() < p_accept for _ in range(task.num_examples))
    room = target - plan_accepted
    accepted = min(wanted, room)
    rejected = {"structure_mismatch": task.num_examples - wanted} if wanted < task.num_examples else {}
    if wanted > accepted:
        rejected["surplus"] = wanted - accepted
    return outcome(
        task,
        accepted,
        rejected,
        usage=Usage(prompt_tokens=100, completion_tokens=50),
        cost_usd=0.001,
        target_reached=plan_accepted + accepted >= target,
    )


@pytest.mark.parametrize("strategy", [Strategy.random, Strategy.tree])
def test_exact_target_with_rejections(strategy: Strategy) -> None:
    target, epc = 50, 5
    request = make_request(strategy=strategy, chains=4, target_count=target, examples_per_call=epc)
    plan = RequestPlan.start(request, 0.0)
    rng = random.Random(7)
    queue: deque[GenerationTask] = deque()
    issued = 0
    t = 0.0
    while not plan.finished:
        t += 1.0
        new = plan.next_tasks(t)
        issued += len(new)
        queue.extend(new)
        assert plan.in_flight <= request.chains
        # Never more in flight than the rest of the target needs.
        assert plan.counts.accepted + (plan.in_flight - 1) * epc < target or not new
        assert queue, "a running plan must have work in flight"
        task = queue.popleft()
        plan.on_outcome(curator(plan.counts.accepted, target, task, rng, 0.7), t)
    assert plan.state is RequestState.COMPLETED
    assert plan.counts.accepted == target
    assert issued > target // epc  # rejections made it issue more than the minimum
    assert plan.next_tasks(t + 1) == [] and not plan.wants_tasks
    status = plan.status(t)
    assert status.accepted == target and status.finished_at == t
    assert status.rejected.get("structure_mismatch", 0) > 0
    assert status.prompt_tokens == 100 * status.llm_calls and status.cost_usd == pytest.approx(0.001 * status.llm_calls)
    assert status.examples_per_second == pytest.approx(target / t)


def test_overshooting_outcome_completes() -> None:
    plan = RequestPlan.start(make_request(chains=1, target_count=3), 0.0)
    task = plan.next_tasks(0.0)[0]
    plan.on_outcome(outcome(task, 5), 1.0)
    assert plan.state is RequestState.COMPLETED and plan.counts.accepted == 5


def test_status_counts_the_429_answers_of_every_outcome() -> None:
    plan = RequestPlan.start(make_request(chains=2, target_count=10), 0.0)
    first, second = plan.next_tasks(0.0)[:2]
    plan.on_outcome(outcome(first, 1).model_copy(update={"attempts": 3, "throttled": 2}), 1.0)
    plan.on_outcome(outcome(second, 1), 2.0)
    status = plan.status(2.0)
    assert (status.throttled_calls, status.llm_calls) == (2, 4)


def test_target_reached_flag_completes() -> None:
    plan = RequestPlan.start(make_request(chains=2, target_count=10), 0.0)
    task = plan.next_tasks(0.0)[0]
    plan.on_outcome(outcome(task, 1, target_reached=True), 1.0)
    assert plan.state is RequestState.COMPLETED


def test_accepted_after_is_the_curators_count_as_reported() -> None:
    plan = RequestPlan.start(make_request(chains=2, target_count=10), 0.0)
    task = plan.next_tasks(0.0)[0]
    assert accepted_after(4, outcome(task, 3), 10) == 7  # the examples the outcome brings
    assert accepted_after(4, outcome(task, 8), 10) == 12  # past the target: counted, not clipped
    # The curator's count reached the target with examples this plan never saw.
    assert accepted_after(4, outcome(task, 1, target_reached=True), 10) == 10
    assert accepted_after(9, outcome(task, 3, target_reached=True), 10) == 12


def test_the_plan_finishes_on_its_accepted_count_alone() -> None:
    plan = RequestPlan.start(make_request(chains=2, target_count=10), 0.0)
    first, second = plan.next_tasks(0.0)[:2]
    plan.on_outcome(outcome(first, 9), 1.0)
    assert not plan.finished and plan.counts.accepted == 9
    plan.on_outcome(outcome(second, 0, target_reached=True), 2.0)
    # What completed the request is what its status reports: the curator's count, at the target.
    assert plan.state is RequestState.COMPLETED and plan.status(2.0).accepted == 10


def test_stops_issuing_near_the_target() -> None:
    plan = RequestPlan.start(make_request(chains=8, target_count=12, examples_per_call=5), 0.0)
    assert len(plan.next_tasks(0.0)) == 3  # 3 * 5 >= 12


def test_max_llm_calls_budget() -> None:
    plan = RequestPlan.start(make_request(chains=8, target_count=100, budget=Budget(max_llm_calls=3)), 0.0)
    tasks = plan.next_tasks(0.0)
    assert len(tasks) == 3
    plan.on_outcome(outcome(tasks[0], 2), 1.0)
    assert plan.next_tasks(1.0) == [] and plan.state is RequestState.RUNNING  # two calls still out
    plan.on_outcome(outcome(tasks[1], 2), 2.0)
    plan.on_outcome(outcome(tasks[2], 1), 3.0)
    assert plan.state is RequestState.BUDGET_EXHAUSTED
    assert "5 of 100" in plan.error
    status = plan.status(3.0)
    assert status.accepted == 5 and status.llm_calls == 3 and status.finished_at == 3.0
    assert plan.next_tasks(4.0) == []


def test_max_cost_budget() -> None:
    plan = RequestPlan.start(make_request(chains=1, target_count=100, budget=Budget(max_cost_usd=0.01)), 0.0)
    calls = 0
    for step in range(10):
        tasks = plan.next_tasks(float(step))
        if not tasks:
            break
        calls += 1
        plan.on_outcome(outcome(tasks[0], 1, cost_usd=0.004), float(step))
    assert calls == 3  # 0.004, 0.008, then 0.012 >= 0.01
    assert plan.state is RequestState.BUDGET_EXHAUSTED
    assert plan.counts.cost_usd == pytest.approx(0.012)


def test_cost_budget_counts_calls_in_flight() -> None:
    plan = RequestPlan.start(make_request(chains=4, target_count=100, budget=Budget(max_cost_usd=0.01)), 0.0)
    first = plan.next_tasks(0.0)
    assert len(first) == 4  # nothing spent yet: the cost of a call is unknown
    plan.on_outcome(outcome(first[0], 1, cost_usd=0.003), 1.0)
    # 0.003 spent + 3 in flight at ~0.003 each = 0.012 >= 0.01: issue nothing more.
    assert plan.next_tasks(1.0) == []
    for task in first[1:]:
        plan.on_outcome(outcome(task, 1, cost_usd=0.003), 2.0)
    assert plan.state is RequestState.BUDGET_EXHAUSTED


def test_stall_names_the_dominant_rejection() -> None:
    plan = RequestPlan.start(make_request(chains=2, target_count=100), 0.0, PlannerLimits(stall_calls=6))
    t = 0.0
    # An accepted example resets the count.
    tasks = plan.next_tasks(t)
    for _ in range(4):
        t += 1
        plan.on_outcome(outcome(tasks.pop(0), 0, {"copy_of_reference": 5}), t)
        tasks += plan.next_tasks(t)
    plan.on_outcome(outcome(tasks.pop(0), 1), t)
    tasks += plan.next_tasks(t)
    assert plan.state is RequestState.RUNNING
    for i in range(6):
        t += 1
        rejected = {"duplicate": 1} if i == 0 else {"copy_of_reference": 5}
        plan.on_outcome(outcome(tasks.pop(0), 0, rejected), t)
        tasks += plan.next_tasks(t)
    assert plan.state is RequestState.FAILED
    assert plan.error.startswith("stalled: 6 calls in a row")
    assert "copy_of_reference 96%" in plan.error and "duplicate 4%" in plan.error
    assert plan.next_tasks(t) == []


def test_stall_on_failing_calls_reports_the_error() -> None:
    plan = RequestPlan.start(make_request(chains=1), 0.0, PlannerLimits(stall_calls=3))
    for step in range(3):
        task = plan.next_tasks(float(step))[0]
        plan.on_outcome(outcome(task, 0, error="connection refused"), float(step))
    assert plan.state is RequestState.FAILED
    assert "llm_error 100%" in plan.error and "connection refused" in plan.error


def test_cancel() -> None:
    plan = RequestPlan.start(make_request(), 0.0)
    tasks = plan.next_tasks(0.0)
    plan.cancel("cancelled by user", 5.0)
    assert plan.state is RequestState.CANCELLED and plan.error == "cancelled by user"
    assert plan.next_tasks(6.0) == [] and not plan.wants_tasks
    # A late outcome still counts what it cost, but the state stays.
    plan.on_outcome(outcome(tasks[0], 0, {"request_closed": 5}, cost_usd=0.002), 7.0)
    status = plan.status(8.0)
    assert status.state is RequestState.CANCELLED and status.finished_at == 5.0
    assert status.cost_usd == pytest.approx(0.002) and status.tasks_in_flight == 2
    plan.cancel("again", 9.0)
    assert plan.error == "cancelled by user"


# ---------------------------------------------------------------------------------------------
# Idempotence and restarts


def test_redelivered_outcome_is_a_no_op() -> None:
    plan = RequestPlan.start(make_request(), 0.0)
    tasks = plan.next_tasks(0.0)
    message = outcome(tasks[0], 3, {"duplicate": 2}, usage=Usage(prompt_tokens=10), cost_usd=0.01)
    plan.on_outcome(message, 1.0)
    before = plan.snapshot()
    plan.on_outcome(message, 2.0)
    plan.on_outcome(TaskOutcome.model_validate_json(message.model_dump_json()), 3.0)
    assert plan.snapshot() == before
    assert plan.counts.accepted == 3 and plan.counts.llm_calls == 1
    # Outcomes of other requests and unknown tasks are ignored as well.
    plan.on_outcome(message.model_copy(update={"request_id": "other"}), 4.0)
    plan.on_outcome(message.model_copy(update={"task_id": "f" * 32}), 4.0)
    assert plan.snapshot() == before


def drive(plan: RequestPlan, tasks: list[GenerationTask], rounds: int, seed: int, embed=None) -> list[list[tuple[str, str | None]]]:
    """Feeds deterministic outcomes round by round; returns the (task id, reference id) issued."""
    rng = random.Random(seed)
    issued = []
    queue = list(tasks)
    for r in range(rounds):
        if not queue:
            break
        task = queue.pop(0)
        n = rng.choice([0, 1, 3, 5])
        plan.on_outcome(outcome(task, [tagged(f"{task.task_id[:6]}-{i}") for i in range(n)]), float(r))
        new = plan.next_tasks(float(r), embed)
        queue.extend(new)
        issued.append([(t.task_id, t.references[0].example_id) for t in new])
    return issued


@pytest.mark.parametrize("strategy", [Strategy.random, Strategy.contrastive, Strategy.tree])
def test_snapshot_restore_continues_identically(strategy: Strategy) -> None:
    class HashEmbedder:
        def embed(self, texts):
            return np.stack([vec(*derive_rng(t).sample(range(1, 100), 4)) for t in texts])

    request = make_request(strategy=strategy, chains=3, target_count=500)
    plan = RequestPlan.start(request, 0.0)
    first = plan.next_tasks(0.0, CachedEmbedder(HashEmbedder()))
    drive(plan, first, 4, seed=1, embed=CachedEmbedder(HashEmbedder()))

    snapshot = json.loads(orjson.dumps(plan.snapshot()))  # through JSON, as on the bus
    restored = RequestPlan.restore(snapshot)
    assert restored.snapshot() == plan.snapshot()
    out = plan.in_flight_tasks()
    assert [t.model_dump() for t in restored.in_flight_tasks()] == [t.model_dump() for t in out]

    a = drive(plan, out, 12, seed=2, embed=CachedEmbedder(HashEmbedder()))
    b = drive(restored, restored.in_flight_tasks(), 12, seed=2, embed=CachedEmbedder(HashEmbedder()))
    assert a == b and sum(len(x) for x in a) >= 8
    assert restored.status(20.0) == plan.status(20.0)


def test_restore_rejects_unknown_versions() -> None:
    snapshot = RequestPlan.start(make_request(), 0.0).snapshot()
    snapshot["version"] = 99
    with pytest.raises(ValueError, match="version"):
        RequestPlan.restore(snapshot)


# ---------------------------------------------------------------------------------------------
# Validation


def test_validate_accepts_a_sane_request() -> None:
    validated = validate_request(make_request(), {"default"}, PlannerLimits())
    assert validated.label_field == "answer" and validated.label_space == ["A", "B"]
    assert validated.example_schema == example_schema(SEED, "answer", ["A", "B"])
    request = make_request()
    assert validate_request(request, None, PlannerLimits()).request is request


@pytest.mark.parametrize(
    ("overrides", "limits", "needle"),
    [
        ({"model": ModelSpec(endpoint="nowhere")}, {}, "unknown endpoint 'nowhere'"),
        ({"formatting_example": {"text": "x" * 5000, "label": "a"}}, {"max_example_bytes": 4096}, "bytes; the limit is 4096"),
        ({"formatting_example": {"a": {"b": {"c": {"d": 1}}}}}, {"max_depth": 3}, "nested deeper than 3"),
        ({"formatting_example": {"a": [[[["deep"]]]]}}, {"max_depth": 3}, "nested deeper than 3"),
        ({"formatting_example": {"text": "y" * 300}}, {"max_string_chars": 200}, "string longer than 200"),
        ({"formatting_example": {"k" * 300: 1}}, {"max_string_chars": 200}, "key longer than 200"),
        ({"formatting_example": {"items": list(range(50))}}, {"max_nodes": 20}, "more than 20 values"),
        ({"target_count": 5000}, {"max_target_count": 1000}, "target_count 5000 exceeds"),
        ({"examples_per_call": 10, "chains": 50}, {"max_examples_in_flight": 400}, "examples_per_call * chains = 500"),
        ({"label_field": "label"}, {}, "label_field 'label' is not in the formatting example"),
        ({"label_field": "answer", "label_space": ["C", "D"]}, {}, "not in label_space"),
        ({"formatting_example": {"text": "t", "tag": "x"}, "label_space": ["x", "y"]}, {}, "no label_field"),
    ],
)
def test_validate_rejections(overrides: dict, limits: dict, needle: str) -> None:
    with pytest.raises(RequestRejected) as rejected:
        validate_request(make_request(**overrides), {"default"}, PlannerLimits(**limits))
    assert needle in str(rejected.value)


def test_validate_dotted_label_field() -> None:
    request = make_request(formatting_example={"meta": {"gold": "yes"}, "text": "t"}, label_field="meta.gold", label_space=["yes", "no"])
    task = RequestPlan.start(validate_request(request, None, PlannerLimits()), 0.0).next_tasks(0.0)[0]
    assert task.label_field == "meta.gold" and task.label_space == ["yes", "no"]
    assert task.example_schema["properties"]["meta"]["properties"]["gold"]["enum"] == ["yes", "no"]


def test_plan_accepts_a_text_embedding_function() -> None:
    vectors = {"Which": vec(1, 0), "near": vec(1, 0.1), "far": vec(0, 1)}
    calls: list[list[str]] = []

    class Model:  # an Embedder: texts -> rows
        def embed(self, texts):
            calls.append(list(texts))
            return np.stack([vectors[t.split(" ")[0]] for t in texts])

    model = Model()
    plan = RequestPlan.start(make_request(chains=2, strategy=Strategy.contrastive, target_count=100), 0.0)
    t0, t1 = plan.next_tasks(0.0, model.embed)
    plan.on_outcome(outcome(t0, [tagged("near"), tagged("far")]), 1.0)
    plan.on_outcome(outcome(t1, [tagged("near"), tagged("far")]), 1.0)
    nxt = plan.next_tasks(1.0, model.embed)
    assert [t.references[0].example_id for t in nxt] == ["ex-far", "ex-far"]
    # One cache across calls and chains: the seed and both examples were embedded once.
    assert sorted(t for batch in calls for t in batch) == sorted(["Which is a fruit? apple brick A", "near A", "far A"])

"""Hard budgets: worst-case reservations, attempts counted as calls, operator caps."""

from __future__ import annotations

import pytest

from datacreator.config import Settings
from datacreator.contracts import Budget, CreationRequest, ModelSpec, RequestState, TaskOutcome, Usage
from datacreator.logic.budget import BudgetLedger, EndpointPrice, OperatorCaps, check_caps, prompt_tokens_upper
from datacreator.logic.planning import PlannerLimits, RequestPlan, RequestRejected, validate_request
from datacreator.logic.prompt import build_messages

SEED = {"question": "Which is a fruit?", "options": {"A": "apple", "B": "brick"}, "answer": "A"}


def make_request(**overrides) -> CreationRequest:
    fields = dict(request_id="req-b", instruction="Write multiple-choice questions.", formatting_example=SEED,
                  target_count=10_000, examples_per_call=5, chains=256)
    fields.update(overrides)
    return CreationRequest(**fields)


def priced(input_per_1m: float, output_per_1m: float, max_attempts: int = 1, **caps) -> PlannerLimits:
    prices = {"default": EndpointPrice(input_per_1m=input_per_1m, output_per_1m=output_per_1m, max_attempts=max_attempts)}
    return PlannerLimits(caps=OperatorCaps(prices=prices, **caps))


def answer(task, limits: PlannerLimits, attempts: int = 1, accepted: int = 0) -> TaskOutcome:
    """The most a provider can bill for the task: every attempt, the prompt at a token per byte, all of max_tokens."""
    price = limits.caps.prices["default"]
    prompt = prompt_tokens_upper(build_messages(task))
    usage = Usage(prompt_tokens=prompt * attempts, completion_tokens=task.model.max_tokens * attempts)
    cost = (usage.prompt_tokens * price.input_per_1m + usage.completion_tokens * price.output_per_1m) / 1e6
    from datacreator.contracts import AcceptedRef

    refs = [AcceptedRef(example_id=f"{task.task_id}-{i}", data=SEED | {"question": f"{task.task_id} {i}"}) for i in range(accepted)]
    return TaskOutcome(task_id=task.task_id, request_id=task.request_id, chain=task.chain, step=task.step,
                       references=task.references, usage=usage, cost_usd=cost, attempts=attempts, accepted=refs)


def drive(plan: RequestPlan, limits: PlannerLimits, attempts: int = 1) -> None:
    now = 0.0
    queue = plan.next_tasks(now)
    while queue and not plan.finished:
        now += 1
        plan.on_outcome(answer(queue.pop(0), limits, attempts, accepted=1), now)
        queue += plan.next_tasks(now)
    for task in queue:  # late outcomes of calls under way when the request ended
        plan.on_outcome(answer(task, limits, attempts), now)


def test_first_wave_respects_the_budget() -> None:
    # Before: 256 tasks went out at once (the mean cost of no call is 0) and spent 256 x the budget.
    limits = priced(10.0, 30.0)
    plan = RequestPlan.start(make_request(budget=Budget(max_cost_usd=1.0)), 0.0, limits)
    tasks = plan.next_tasks(0.0)
    worst = BudgetLedger(plan.request, limits.caps).worst_case(tasks[0])
    assert 0 < len(tasks) <= 1.0 / worst < 256


@pytest.mark.parametrize("prices", [(10.0, 30.0), (1_000.0, 50_000.0), (1e6, 1e6), (0.0, 1e5)])
@pytest.mark.parametrize("attempts", [1, 3])
def test_final_cost_never_exceeds_the_budget(prices, attempts) -> None:
    limits = priced(*prices, max_attempts=3)
    plan = RequestPlan.start(make_request(budget=Budget(max_cost_usd=5.0)), 0.0, limits)
    drive(plan, limits, attempts)
    status = plan.status(1e6)
    assert status.state is RequestState.BUDGET_EXHAUSTED
    assert status.cost_usd <= 5.0
    assert f"${status.cost_usd:.4f}" in status.error and status.tasks_in_flight == 0


def test_a_budget_too_small_for_one_call_spends_nothing() -> None:
    limits = priced(1e6, 1e6)
    plan = RequestPlan.start(make_request(budget=Budget(max_cost_usd=0.5)), 0.0, limits)
    assert plan.next_tasks(0.0) == []
    assert plan.state is RequestState.BUDGET_EXHAUSTED and plan.counts.cost_usd == 0


def test_unused_reservation_is_released() -> None:
    limits = priced(10.0, 30.0)
    plan = RequestPlan.start(make_request(budget=Budget(max_cost_usd=0.25), chains=8), 0.0, limits)
    first = plan.next_tasks(0.0)
    cheap = answer(first[0], limits, accepted=1).model_copy(update={"cost_usd": 0.0001})
    plan.on_outcome(cheap, 1.0)
    assert len(plan.next_tasks(1.0)) == 1  # its worst case is free again


def test_max_llm_calls_counts_every_attempt() -> None:
    # Before: a task counted as one call however many HTTP attempts it made.
    limits = priced(0.0, 0.0)
    plan = RequestPlan.start(make_request(chains=1, budget=Budget(max_llm_calls=6)), 0.0, limits)
    drive(plan, limits, attempts=3)
    assert plan.state is RequestState.BUDGET_EXHAUSTED
    assert plan.counts.llm_calls == 6 and plan.counts.tasks_issued == 2


def test_operator_caps_reject_at_validation(monkeypatch) -> None:
    monkeypatch.setenv("DATACREATOR_MAX_TARGET_COUNT", "1000")
    monkeypatch.setenv("DATACREATOR_MAX_TOKENS_PER_CALL", "4096")
    monkeypatch.setenv("DATACREATOR_MAX_COST_PER_REQUEST", "20")
    monkeypatch.setenv("DATACREATOR_DEFAULT_MAX_COST_USD", "2")
    settings = Settings()
    from datacreator.handlers.planner import PlannerHandler

    limits = PlannerHandler(settings).limits
    known = {"default"}

    def reason(request) -> str:
        with pytest.raises(RequestRejected) as rejected:
            validate_request(request, known, limits)
        return str(rejected.value)

    assert "exceeds the limit of 1000" in reason(make_request(target_count=1_000_000))
    assert "operator limit of 4096" in reason(make_request(model=ModelSpec(max_tokens=32_768)))
    assert "operator limit of 20 per request" in reason(make_request(target_count=10, budget=Budget(max_cost_usd=500)))
    assert validate_request(make_request(target_count=10, budget=Budget(max_cost_usd=20)), known, limits).request.target_count == 10
    # A request without a budget gets the default one.
    assert BudgetLedger(make_request(), limits.caps).max_cost_usd == 2
    assert BudgetLedger(make_request(), OperatorCaps(max_cost_per_request=7)).max_cost_usd == 7
    assert BudgetLedger(make_request(budget=Budget(max_cost_usd=1)), limits.caps).max_cost_usd == 1
    assert check_caps(make_request(), OperatorCaps()) is None


def test_settings_carry_endpoint_prices() -> None:
    settings = Settings(endpoints_json='{"default": {"base_url": "http://x/v1", "model": "m", "input_price_per_1m": 2.5, '
                        '"output_price_per_1m": 10, "max_attempts": 4}}')
    price = settings.operator_caps().prices["default"]
    assert (price.input_per_1m, price.output_per_1m, price.max_attempts) == (2.5, 10.0, 4)

"""Label checks: the blind prompt, reading the verifier's answer, the per-mode decision, the
accounting of verification calls (real simulator, real rate limiter), and end-to-end runs on
the real broker with the simulator as generator and verifier."""

from __future__ import annotations

import orjson
import pytest

from datacreator import remote
from datacreator.config import EndpointConfig
from datacreator.contracts import (
    Candidate,
    CreationRequest,
    Rejection,
    RejectReason,
    RequestState,
    Strategy,
    Verification,
    VerifyMode,
)
from datacreator.llm.client import LLMClient
from datacreator.llm.verify import verify_answer
from datacreator.logic.curation import RequestCuration
from datacreator.logic.planning import PlannerLimits, RequestPlan
from datacreator.logic.prompt import build_messages, response_format
from datacreator.logic.verify import (
    Decision,
    build_verify_messages,
    decide,
    parse_verifier_answer,
    verify_response_format,
    verify_targets,
)
from datacreator.ratelimit import LocalRateLimiter
from datacreator.serve import ServiceGroup
from datacreator.simulator.app import Simulator
from datacreator.simulator.config import SimulatorConfig
from datacreator.stack import LLMTarget, endpoint_json
from tests.helpers import MCQ, MCQ_INSTRUCTION, example_records, records_of, rejection_reason

SENTIMENT = {"text": "The train was on time and the seats were clean.", "label": "positive"}


def _task(verify: str = "reject", seed: dict = MCQ, **request):
    req = CreationRequest(instruction=MCQ_INSTRUCTION, formatting_example=seed, target_count=50, verify=verify, **request)
    return RequestPlan.start(req, 0.0).next_tasks(0.0)[0]


def _answer(task, seed: int = 1) -> str:
    sim = Simulator(SimulatorConfig(seed=seed))
    return sim.write({"messages": build_messages(task), "response_format": response_format(task, "json_schema")}, sim.config)


# -- pure parts ------------------------------------------------------------------------------


def test_prompt_lists_the_label_space_and_holds_no_created_label():
    task = _task()
    items = [dict(MCQ, question=f"Question number {i}?", answer=letter) for i, letter in enumerate("ACDB")]
    messages = build_verify_messages(task, items)
    user = messages[-1]["content"]
    shown = user.split("Item 1:")[1].split("For each item")[0]
    assert '"answer"' not in shown, "a created label leaked"
    for item in items:
        assert item["question"] in shown and item["options"]["A"] in shown
    assert all("answer" in item for item in items), "the items themselves are not changed"
    assert 'one of: "A", "B", "C", "D"' in user and "exactly 4 values" in user
    fmt = verify_response_format(task, 4, "json_schema")
    labels = fmt["json_schema"]["schema"]["properties"]["labels"]
    assert labels["items"] == {"enum": ["A", "B", "C", "D"]} and labels["minItems"] == labels["maxItems"] == 4
    assert verify_response_format(task, 4, "json_object") == {"type": "json_object"}
    assert verify_response_format(task, 4, "none") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"labels": ["A", "b", " C", "D"]}', ["A", "B", "C", "D"]),
        ('["A", "B", "C", "D"]', ["A", "B", "C", "D"]),
        ('Sure:\n```json\n{"labels": ["A", "E", "C", 3]}\n```', ["A", None, "C", None]),
        ('{"labels": ["A", "B"]}', [None] * 4),  # wrong length: cannot be aligned
        ('{"labels": ["A", "B", "C"', [None] * 4),  # cut off
        ("I cannot label these.", [None] * 4),
        (None, [None] * 4),
    ],
)
def test_verifier_answers_are_read_and_malformed_ones_leave_items_unverified(text, expected):
    assert parse_verifier_answer(text, 4, ["A", "B", "C", "D"]) == expected


def test_boolean_labels_are_read_from_strings():
    assert parse_verifier_answer('{"labels": [true, "false", "True"]}', 3, [True, False]) == [True, False, True]


@pytest.mark.parametrize(
    ("mode", "verified", "expected"),
    [
        (VerifyMode.reject, "A", Decision.agree), (VerifyMode.reject, "B", Decision.reject),
        (VerifyMode.relabel, "A", Decision.agree), (VerifyMode.relabel, "B", Decision.relabel),
        (VerifyMode.reject, None, Decision.unverified), (VerifyMode.relabel, None, Decision.unverified),
        (VerifyMode.off, "B", Decision.unverified),
    ],
)
def test_decision_per_mode(mode, verified, expected):
    assert decide("A", verified, mode) is expected


def test_true_is_not_one_for_the_decision():
    assert decide(True, 1, VerifyMode.reject) is Decision.reject


def _curate(mode: str, labels_for) -> tuple:
    task = _task(mode)
    raw = _answer(task)
    targets = verify_targets(task, raw)
    labels: list = [None] * targets.parsed
    for index, item in zip(targets.indexes, targets.items):
        labels[index] = labels_for(index, item)
    candidate = Candidate(task=task, endpoint="default", model="m", raw_output=raw,
                          verification=Verification(endpoint="default", model="m", labels=labels, calls=1))
    return targets, RequestCuration.for_task(task).curate(candidate)


def _other(letter: str) -> str:
    return "B" if letter != "B" else "C"


def test_curator_rejects_disagreements_in_reject_mode():
    targets, result = _curate("reject", lambda i, item: item["answer"] if i % 2 else _other(item["answer"]))
    disagreeing = [item for i, item in zip(targets.indexes, targets.items) if i % 2 == 0]
    rejected = [r for r in result.rejections if r.reason is RejectReason.label_disagreement]
    assert [r.item for r in rejected] == disagreeing and "verifier says" in rejected[0].detail
    assert len(result.examples) == targets.parsed - len(disagreeing)
    assert all(e.verified is True and e.relabelled_from is None for e in result.examples)
    tally = result.outcome.verification
    assert sum(tally.checked.values()) == targets.parsed and sum(tally.disagreed.values()) == len(disagreeing)
    assert result.outcome.rejected == {"label_disagreement": len(disagreeing)}


def test_curator_relabels_in_relabel_mode_and_marks_the_item():
    targets, result = _curate("relabel", lambda i, item: _other(item["answer"]) if i == 0 else item["answer"])
    assert len(result.examples) == targets.parsed and not result.rejections
    first = result.examples[0]
    assert first.data["answer"] == _other(targets.items[0]["answer"]) and first.relabelled_from == targets.items[0]["answer"]
    assert first.data["question"] == targets.items[0]["question"]
    assert all(e.relabelled_from is None for e in result.examples[1:])
    assert result.outcome.verification.disagreed == {targets.items[0]["answer"]: 1}


def test_unreadable_labels_keep_items_unverified():
    targets, result = _curate("reject", lambda i, item: None)
    assert len(result.examples) == targets.parsed and not result.rejections
    assert all(e.verified is None for e in result.examples)
    assert result.outcome.verification.unverified == targets.parsed and not result.outcome.verification.checked


def test_verify_needs_a_label_and_a_known_endpoint():
    limits = PlannerLimits()
    free = CreationRequest(instruction="x", formatting_example={"text": "hello", "mood": "calm"}, target_count=3, verify="reject")
    assert "needs a label" in rejection_reason(free, {"default"}, limits)
    elsewhere = CreationRequest(instruction="x", formatting_example=SENTIMENT, target_count=3, label_field="label", label_space=["positive", "negative"],
                                verify="relabel", verify_endpoint="judge")
    assert "unknown verify_endpoint" in rejection_reason(elsewhere, {"default"}, limits)
    assert rejection_reason(elsewhere, {"default", "judge"}, limits) is None


# -- accounting: simulator + the real limiter ---------------------------------------------------


async def test_verification_call_is_rate_limited_and_counted_like_a_generation_call(make_simulator):
    window = 1.0
    sim = make_simulator(rpm=4, rate_window_s=window, verify_agreement=0.6, seed=3)
    cfg = EndpointConfig(base_url=sim.base_url, model="sim-model", input_price_per_1m=0.5, output_price_per_1m=1.5)
    llm = LLMClient("verify-acct", cfg, LocalRateLimiter(4, None, window_s=window))

    class Pool:
        def get(self, alias):
            return llm

    tasks = [_task("reject") for _ in range(6)]
    try:
        results = []
        for task in tasks:
            generated = await llm.complete(task)
            results.append((generated, await verify_answer(Pool(), task, generated.text)))
    finally:
        await llm.aclose()
    assert sim.stats.admitted_count == 12, "two calls per task: generation and verification"
    assert sim.stats.status(429) == 0 and sim.stats.max_admitted_in_window(window) <= 4
    verify_prompt = sum(v.usage.prompt_tokens for _, v in results)
    total_prompt = sum(g.usage.prompt_tokens for g, _ in results) + verify_prompt
    assert total_prompt == sim.stats.prompt_tokens and verify_prompt > 0
    for generated, verification in results:
        assert verification.calls == 1 and verification.error is None
        expected = (verification.usage.prompt_tokens * 0.5 + verification.usage.completion_tokens * 1.5) / 1e6
        assert expected > 0 and verification.cost_usd == pytest.approx(expected)
        assert len(verification.labels) == len(orjson.loads(generated.text)["examples"])
    labels = [label for _, v in results for label in v.labels]
    assert all(label in ("A", "B", "C", "D") for label in labels)


# -- end to end -------------------------------------------------------------------------------


def _settings_for(bus_settings, simulator):
    return bus_settings.with_updates(endpoints_json=endpoint_json(LLMTarget(simulator.base_url, "datacreator-simulator")))


@pytest.mark.parametrize("mode", ["reject", "relabel"])
async def test_end_to_end_with_label_checks(bus_settings, make_simulator, mode):
    sim = make_simulator(verify_agreement=0.7, seed=11)
    settings = _settings_for(bus_settings, sim)
    group = await ServiceGroup(settings).start()
    try:
        request = CreationRequest(instruction=MCQ_INSTRUCTION, formatting_example=MCQ, target_count=20, examples_per_call=5,
                                  strategy=Strategy.random, chains=2, verify=mode)
        await remote.submit(settings, request)
        final = await remote.wait_for_final(settings, request.request_id, timeout_s=90)
        examples = await example_records(settings, request.request_id)
        rejections = await records_of(settings, settings.topics.rejected, Rejection, request.request_id)
    finally:
        await group.stop()
    assert final.state == RequestState.COMPLETED, final.error
    assert final.accepted == 20 and len({e.example_id for e in examples}) == 20
    assert final.verify_calls == final.llm_calls, "one verification call per generation call"
    assert final.verify_prompt_tokens > 0 and final.verify_prompt_tokens < final.prompt_tokens
    assert sim.stats.admitted_count == final.llm_calls + final.verify_calls
    disagreements = sum(final.verify_disagreements.values())
    assert disagreements > 0 and sum(final.verify_checked.values()) >= disagreements
    disagreeing = [r for r in rejections if r.reason is RejectReason.label_disagreement]
    if mode == "reject":
        assert len(disagreeing) == final.rejected["label_disagreement"] == disagreements
        assert all(e.relabelled_from is None and e.verified for e in examples)
    else:
        assert not disagreeing
        relabelled = [e for e in examples if e.relabelled_from is not None]
        assert relabelled and all(e.data["answer"] != e.relabelled_from for e in relabelled)
        assert all(e.data["answer"] in e.data["options"] for e in examples)


def test_quality_report_shows_disagreements_per_label():
    from datacreator.contracts import RequestStatus
    from datacreator.report import verification_figures, verification_lines

    status = RequestStatus(request_id="r", state=RequestState.COMPLETED, verify_calls=4, verify_cost_usd=0.001,
                           verify_checked={"A": 10, "B": 5}, verify_disagreements={"B": 2}, verify_unverified=1)
    figures = verification_figures(status)
    assert figures["by_label"]["B"] == {"checked": 5, "disagreed": 2, "share": 0.4}
    assert figures["by_label"]["A"]["share"] == 0.0
    assert verification_figures(RequestStatus(request_id="r", state=RequestState.COMPLETED)) is None

    text = "\n".join(verification_lines(figures))
    assert "disagreed on 2 of 15" in text and "B 2/5" in text and "A 0/10" in text


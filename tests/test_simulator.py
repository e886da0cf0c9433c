"""The LLM simulator over real HTTP: answers, rate limits, faults, counters and controls."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx
import jsonschema
import pytest

from datacreator.simulator import MODEL_NAME, SimulatorConfig, SimulatorServer, create_app
from datacreator.simulator.latency import longtail
from tests.helpers import make_task

LABELS = ["A", "B", "C", "D"]
MC_EXAMPLE = {
    "question": "Which tool is the best choice for driving a nail into a wooden board?",
    "options": {"A": "A screwdriver", "B": "A hammer", "C": "A hand saw", "D": "A tape measure"},
    "answer": "B",
}
SENTIMENT_EXAMPLE = {"text": "The soup was cold and the waiter never came back to our table.", "label": "negative", "score": 2, "verified": True}
SENTIMENT_LABELS = ["negative", "neutral", "positive"]


def user_prompt(example: dict[str, Any], n: int) -> str:
    return (
        "Create new multiple choice questions about everyday objects.\n\n"
        f"Formatting example:\n```json\n{json.dumps(example, indent=2)}\n```\n\n"
        f"Write exactly {n} new examples in the same JSON structure. "
        'Answer with one JSON object {"examples": [...]}.'
    )


def messages(example: dict[str, Any] = MC_EXAMPLE, n: int = 5) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You create training data."}, {"role": "user", "content": user_prompt(example, n)}]


def sentiment_schema(n: int) -> dict[str, Any]:
    item = {
        "type": "object",
        "properties": {
            "text": {"type": "string", "minLength": 10, "maxLength": 200},
            "label": {"type": "string", "enum": SENTIMENT_LABELS},
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
            "verified": {"type": "boolean"},
            "source": {"type": ["string", "null"]},
            "topics": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 1, "maxItems": 3},
            "kind": {"const": "review"},
            "extra": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        },
        "required": ["text", "label", "score", "verified", "source", "topics", "kind", "extra"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"examples": {"type": "array", "items": item, "minItems": n, "maxItems": n}},
        "required": ["examples"],
        "additionalProperties": False,
    }


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "examples", "schema": schema, "strict": True}}


def body(example: dict[str, Any] = MC_EXAMPLE, n: int = 5, response_format: Any = None, max_tokens: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": "any", "messages": messages(example, n)}
    if response_format is not None:
        out["response_format"] = response_format
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    return out


def post(sim: SimulatorServer, payload: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{sim.base_url}/chat/completions", json=payload, **kwargs)


def content_of(response: httpx.Response) -> str:
    return response.json()["choices"][0]["message"]["content"]


def shingles(text: str, k: int = 3) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + k]) for i in range(max(1, len(words) - k + 1))}


def jaccard(a: set[Any], b: set[Any]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def prompt_tokens_of(payload: dict[str, Any]) -> int:
    return math.ceil(sum(len(m["content"]) for m in payload["messages"]) / 4)


# ---------------------------------------------------------------------------------------------
# What it answers


def test_json_schema_answers_validate_against_the_sent_schema(simulator: SimulatorServer) -> None:
    n = 6
    schema = sentiment_schema(n)
    labels: list[str] = []
    for _ in range(5):
        response = post(simulator, body(SENTIMENT_EXAMPLE, n, schema_format(schema)))
        assert response.status_code == 200
        data = response.json()
        assert data["object"] == "chat.completion" and data["model"] == MODEL_NAME
        assert data["choices"][0]["finish_reason"] == "stop"
        text = content_of(response)
        answer = json.loads(text)
        jsonschema.validate(answer, schema)
        assert len(answer["examples"]) == n
        labels += [item["label"] for item in answer["examples"]]
        usage = data["usage"]
        assert usage["completion_tokens"] == math.ceil(len(text) / 4)
        assert usage["prompt_tokens"] == prompt_tokens_of(body(SENTIMENT_EXAMPLE, n))
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert set(labels) <= set(SENTIMENT_LABELS)
    assert len(set(labels)) == len(SENTIMENT_LABELS), "labels are drawn from the whole enum"


@pytest.mark.parametrize("response_format", [{"type": "json_object"}, None])
def test_multiple_choice_from_the_formatting_example(simulator: SimulatorServer, response_format: Any) -> None:
    answers = []
    for _ in range(4):
        response = post(simulator, body(MC_EXAMPLE, 5, response_format))
        items = json.loads(content_of(response))["examples"]
        assert len(items) == 5
        for item in items:
            assert list(item) == list(MC_EXAMPLE)
            assert list(item["options"]) == LABELS
            assert all(isinstance(v, str) and v for v in item["options"].values())
            assert isinstance(item["question"], str) and item["question"] != MC_EXAMPLE["question"]
            assert 0.5 * len(MC_EXAMPLE["question"]) <= len(item["question"]) <= 1.5 * len(MC_EXAMPLE["question"])
            assert item["answer"] in LABELS
            answers.append(item["answer"])
    assert len(set(answers)) > 1


def test_example_mode_keeps_value_types(simulator: SimulatorServer) -> None:
    items = json.loads(content_of(post(simulator, body(SENTIMENT_EXAMPLE, 8))))["examples"]
    assert len(items) == 8
    for item in items:
        assert {k: type(v) for k, v in item.items()} == {k: type(v) for k, v in SENTIMENT_EXAMPLE.items()}
        assert item["label"] == "negative", "a label space the example does not show stays as shown"
    assert len({item["verified"] for item in items}) == 2


@pytest.mark.parametrize("mode", ["json_schema", "json_object"])
@pytest.mark.parametrize(
    ("example", "label_space"),
    [
        (MC_EXAMPLE, None),
        ({"goal": "Open a jar whose lid is stuck.", "options": ["Run the lid under hot water.", "Freeze the jar."], "answer": 0}, None),
        ({"q": "Which city is the capital of France?", "choices": ["Paris", "Lyon", "Nice"], "answer": "Paris"}, None),
        ({"premise": "A man plays a guitar on stage.", "hypothesis": "A person makes music.", "label": "entailment"}, ["entailment", "neutral", "contradiction"]),
    ],
)
def test_answers_to_the_project_prompt_pass_its_validation(simulator: SimulatorServer, mode: str, example: dict[str, Any], label_space: list[str] | None) -> None:
    from datacreator.logic.prompt import build_messages, response_format
    from datacreator.logic.shape import example_schema, get_path, infer_label

    field, space = ("label", label_space) if label_space else infer_label(example)
    task = make_task("t", request_id="r", seed=example, instruction="Create new examples.", num_examples=4,
                     example_schema=example_schema(example, field, space), label_field=field, label_space=space)
    payload: dict[str, Any] = {"model": "any", "messages": build_messages(task)}
    if (fmt := response_format(task, mode)) is not None:
        payload["response_format"] = fmt
    labels = []
    for _ in range(5):
        items = json.loads(content_of(post(simulator, payload)))["examples"]
        assert len(items) == 4
        for item in items:
            jsonschema.validate(item, task.example_schema)
            label = get_path(item, field)
            if space is not None:
                assert label in space
            else:  # the answer is one of the item's own options
                assert label in get_path(item, "choices")
            labels.append(label)
    assert len(set(labels)) > 1


def test_strings_differ_within_and_across_calls(simulator: SimulatorServer) -> None:
    texts: list[str] = []
    for i in range(8):
        fmt = schema_format(sentiment_schema(5)) if i % 2 else None
        items = json.loads(content_of(post(simulator, body(SENTIMENT_EXAMPLE if i % 2 else MC_EXAMPLE, 5, fmt))))["examples"]
        texts += [item.get("text") or item["question"] for item in items]
    assert len(set(texts)) == len(texts) == 40
    sets = [shingles(t) for t in texts]
    worst = max(jaccard(a, b) for a, b in itertools.combinations(sets, 2))
    assert worst < 0.5


def test_same_seed_same_answers(make_simulator: Any) -> None:
    first, second = make_simulator(seed=7), make_simulator(seed=7)
    payload = body(MC_EXAMPLE, 3)
    assert content_of(post(first, payload)) == content_of(post(second, payload))
    assert content_of(post(first, payload)) != content_of(post(first, payload))


# ---------------------------------------------------------------------------------------------
# Rate limits


async def fire(sim: SimulatorServer, payloads: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(payloads))
    async with httpx.AsyncClient(base_url=sim.base_url, limits=limits, timeout=10) as client:
        return list(await asyncio.gather(*(client.post("/chat/completions", json=p) for p in payloads)))


async def test_rpm_limit_admits_exactly_rpm_requests(make_simulator: Any) -> None:
    rpm, extra = 6, 4
    sim = make_simulator(rpm=rpm)
    responses = await fire(sim, [body(n=2)] * (rpm + extra))
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert len(ok) == rpm and len(limited) == extra
    for r in limited:
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.headers["x-ratelimit-limit-requests"] == str(rpm)
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert 0 < float(r.headers["x-ratelimit-reset-requests"].removesuffix("s")) <= 60
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok)
    assert remaining == list(range(rpm))
    assert sim.stats.max_admitted_in_window(60.0) == rpm
    assert sim.stats.status(200) == rpm and sim.stats.status(429) == extra
    assert len(sim.stats.refused_at) == extra and min(sim.stats.refused_at) >= min(sim.stats.admitted_at)  # benchmarks.limit_change
    assert sim.stats.requests == rpm + extra


async def test_tpm_limit_counts_prompt_and_max_tokens(make_simulator: Any) -> None:
    max_tokens = 300
    payload = body(n=2, max_tokens=max_tokens)
    cost = prompt_tokens_of(payload) + max_tokens
    admitted = 3
    tpm = admitted * cost + cost // 2
    sim = make_simulator(tpm=tpm)
    responses = await fire(sim, [payload] * (admitted + 3))
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert len(ok) == admitted and len(limited) == 3
    for r in limited:
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-limit-tokens"] == str(tpm)
        assert int(r.headers["x-ratelimit-remaining-tokens"]) == tpm - admitted * cost
        assert r.headers["x-ratelimit-reset-tokens"].endswith("s")
        assert r.json()["error"]["type"] == "tokens"
    assert sorted(int(r.headers["x-ratelimit-remaining-tokens"]) for r in ok) == [tpm - k * cost for k in range(admitted, 0, -1)]
    assert sim.stats.max_tokens_in_window() == admitted * cost <= tpm
    assert sim.stats.admitted_tokens == [cost] * admitted


def test_tpm_counts_completion_tokens_without_max_tokens(make_simulator: Any) -> None:
    sim = make_simulator(tpm=1_000_000)
    response = post(sim, body(n=3))
    assert sim.stats.admitted_tokens == [response.json()["usage"]["total_tokens"]]
    sim.configure(tpm_counts_max_tokens=False)
    response = post(sim, body(n=3, max_tokens=5000))
    assert sim.stats.admitted_tokens[-1] == response.json()["usage"]["total_tokens"]


def test_window_slides_and_retry_after_is_enough(make_simulator: Any) -> None:
    sim = make_simulator(rpm=2, rate_window_s=1.0)
    assert [post(sim, body(n=1)).status_code for _ in range(3)] == [200, 200, 429]
    refused = post(sim, body(n=1))
    wait = int(refused.headers["retry-after"])
    assert wait == 1
    time.sleep(wait + 0.05)
    assert post(sim, body(n=1)).status_code == 200
    assert sim.stats.max_admitted_in_window(1.0) == 2


def test_request_larger_than_tpm_is_refused(make_simulator: Any) -> None:
    sim = make_simulator(tpm=100)
    response = post(sim, body(n=1, max_tokens=1000))
    assert response.status_code == 429
    assert "too large" in response.json()["error"]["message"]
    assert sim.stats.admitted_count == 0


# ---------------------------------------------------------------------------------------------
# Faults


@pytest.mark.parametrize(("setting", "codes"), [("error_rate", {500, 503}), ("storm_429_rate", {429})])
def test_request_fault_shares(make_simulator: Any, setting: str, codes: set[int]) -> None:
    share, total = 0.3, 200
    sim = make_simulator(**{setting: share}, seed=11)
    with httpx.Client(base_url=sim.base_url) as client:
        statuses = [client.post("/chat/completions", json=body(n=1)).status_code for _ in range(total)]
    faulted = [s for s in statuses if s in codes]
    assert set(statuses) <= codes | {200}
    assert abs(len(faulted) / total - share) < 0.1
    assert set(faulted) == codes
    assert sum(sim.stats.faults.values()) == len(faulted)
    if setting == "storm_429_rate":
        assert sim.stats.admitted_count == total - len(faulted), "a storm 429 is not an admission"


def test_malformed_answers_are_not_json(make_simulator: Any) -> None:
    sim = make_simulator(malformed_rate=1.0, seed=3)
    kinds = set()
    for _ in range(20):
        text = content_of(post(sim, body(n=2)))
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
        kinds.add("fenced" if "```json" in text else "truncated")
    assert kinds == {"fenced", "truncated"}
    assert sim.stats.faults["malformed_fenced"] + sim.stats.faults["malformed_truncated"] == 20


def test_wrong_structure_items_fail_the_schema(make_simulator: Any) -> None:
    sim = make_simulator(wrong_structure_rate=1.0)
    schema = sentiment_schema(5)
    item_schema = schema["properties"]["examples"]["items"]
    items = json.loads(content_of(post(sim, body(SENTIMENT_EXAMPLE, 5, schema_format(schema)))))["examples"]
    assert len(items) == 5
    for item in items:
        assert not jsonschema.Draft202012Validator(item_schema).is_valid(item)
    items = json.loads(content_of(post(sim, body(MC_EXAMPLE, 5))))["examples"]
    for item in items:
        same = set(item) == set(MC_EXAMPLE) and all(type(item[k]) is type(MC_EXAMPLE[k]) for k in item)
        assert not same
    assert sim.stats.faults["wrong_structure"] == 10


def test_labels_out_of_space(make_simulator: Any) -> None:
    sim = make_simulator(label_out_of_space_rate=1.0)
    items = json.loads(content_of(post(sim, body(SENTIMENT_EXAMPLE, 5, schema_format(sentiment_schema(5))))))["examples"]
    assert all(item["label"] not in SENTIMENT_LABELS for item in items)
    items = json.loads(content_of(post(sim, body(MC_EXAMPLE, 5))))["examples"]
    assert all(item["answer"] not in item["options"] for item in items)
    assert sim.stats.faults["label_out_of_space"] == 10


def test_copies_of_the_formatting_example(make_simulator: Any) -> None:
    sim = make_simulator(copy_rate=0.5, seed=5)
    items = []
    for _ in range(10):
        items += json.loads(content_of(post(sim, body(MC_EXAMPLE, 5, {"type": "json_object"}))))["examples"]
    copies = sum(item == MC_EXAMPLE for item in items)
    assert 15 <= copies <= 35
    assert sim.stats.faults["copy"] == copies


def test_timeout_fault_holds_the_request(make_simulator: Any) -> None:
    sim = make_simulator(timeout_rate=1.0, timeout_hold_s=5.0)
    with pytest.raises(httpx.ReadTimeout):
        post(sim, body(n=1), timeout=0.5)
    assert sim.stats.timeouts_held == 1
    started = time.monotonic()
    sim.stop()
    assert time.monotonic() - started < 3.0, "a held request does not delay shutdown"


def test_fixed_latency_and_per_token_delay(make_simulator: Any) -> None:
    sim = make_simulator(latency_s=0.3)
    started = time.monotonic()
    assert post(sim, body(n=1)).status_code == 200
    assert time.monotonic() - started >= 0.3
    sim.configure(latency_s=0.0, latency_per_token_s=0.002)
    started = time.monotonic()
    tokens = post(sim, body(n=2)).json()["usage"]["completion_tokens"]
    assert time.monotonic() - started >= 0.002 * tokens


def test_longtail_latency_has_the_asked_median_and_p99() -> None:
    rng = random.Random(0)
    samples = sorted(longtail(rng, 0.2, 2.0) for _ in range(20_000))
    assert statistics.median(samples) == pytest.approx(0.2, rel=0.05)
    assert samples[int(0.99 * len(samples))] == pytest.approx(2.0, rel=0.15)


# ---------------------------------------------------------------------------------------------
# Controls, counters, auth, CLI


def test_stats_reset_and_config_endpoints(simulator: SimulatorServer) -> None:
    with httpx.Client(base_url=simulator.url) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL_NAME]
        usage = [client.post("/v1/chat/completions", json=body(n=2)).json()["usage"] for _ in range(3)]
        stats = client.get("/sim/stats").json()
        assert stats["requests"] == 3 and stats["responses"] == {"200": 3} and stats["admitted"] == 3
        assert stats["prompt_tokens"] == sum(u["prompt_tokens"] for u in usage)
        assert stats["completion_tokens"] == sum(u["completion_tokens"] for u in usage)
        assert stats["max_admitted_in_60s"] == 3 == simulator.stats.max_admitted_in_window()

        changed = client.post("/sim/config", json={"error_rate": 1.0}).json()
        assert changed["error_rate"] == 1.0 and simulator.config.error_rate == 1.0
        assert client.post("/v1/chat/completions", json=body(n=1)).status_code in (500, 503)
        assert client.post("/sim/config", json={"error_rate": 2.0}).status_code == 400
        assert client.post("/sim/config", json={"no_such_setting": 1}).status_code == 400

        assert client.post("/sim/reset").status_code == 200
        stats = client.get("/sim/stats").json()
        assert stats["requests"] == 0 and stats["responses"] == {} and stats["admitted_at"] == []
        assert simulator.stats.prompt_tokens == 0
        assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        assert client.post("/v1/chat/completions", content=b"{not json").status_code == 400


def test_api_key_is_checked_and_never_echoed(make_simulator: Any) -> None:
    key = "sk-simulator-" + os.urandom(8).hex()
    sim = make_simulator(api_key=key)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
        response = post(sim, body(n=1), headers=headers)
        assert response.status_code == 401
        assert key not in response.text and "wrong" not in response.text
    assert httpx.get(f"{sim.base_url}/models").status_code == 401
    assert post(sim, body(n=1), headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert key not in httpx.get(f"{sim.url}/sim/stats").text + httpx.get(f"{sim.url}/sim/config").text
    assert key not in repr(sim.config)
    assert sim.stats.status(401) == 3


async def test_app_in_process() -> None:
    app = create_app(SimulatorConfig(seed=1))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://simulator/v1") as client:
        response = await client.post("/chat/completions", json=body(n=4))
    assert len(json.loads(content_of(response))["examples"]) == 4
    assert app.state.simulator.status(200) == 1


def test_command_line_serves_until_stopped() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "datacreator.simulator", "--port", "0", "--rpm", "100", "--seed", "3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("datacreator LLM simulator listening on http://127.0.0.1:")
        base_url = line.split()[5]
        response = httpx.post(f"{base_url}/chat/completions", json=body(n=2), timeout=10)
        assert response.status_code == 200 and response.headers["x-ratelimit-limit-requests"] == "100"
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert process.wait(timeout=10) == 0

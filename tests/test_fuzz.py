"""Property-based fuzzing of everything a service consumes.

- Direct (no broker): thousands of generated requests through `codec.decode_request` and
  `planning.validate_request`; each is a request or a reason, never an unexpected exception,
  and every request built to break a rule gets a reason.
- Through the bus: over a thousand generated bad messages on the requests, tasks, candidates,
  outcomes and examples topics, published in one batch; each is answered (a REJECTED status or a
  dead letter with a reason), no service stops, and a valid request still completes afterwards.
"""

from __future__ import annotations

import asyncio
import json
import time
import types
import typing
from collections.abc import Callable
from enum import Enum
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydantic import BaseModel

from datacreator import remote
from datacreator.bus.codec import PoisonMessage, decode, decode_request
from datacreator.bus.factory import make_producer
from datacreator.bus.readback import read_to_end
from datacreator.contracts import (
    MAX_CHAINS,
    MAX_EXAMPLES_PER_CALL,
    MAX_INSTRUCTION_CHARS,
    MAX_TARGET_COUNT,
    Candidate,
    CreationRequest,
    DeadLetter,
    Example,
    RequestState,
    RequestStatus,
    TaskOutcome,
    Usage,
)
from datacreator.handlers.sink import SinkHandler
from datacreator.logic.planning import PlannerLimits
from datacreator.serve import ServiceGroup, build_handler
from datacreator.stack import LLMTarget, endpoint_json
from tests.helpers import rejection_reason
from tests.test_poison import FAST_GROUPS, sample_task

SEED = {"question": "What do bees make?", "answer": "honey"}
LIMITS = PlannerLimits()
ENDPOINTS = {"default"}
REQUEST_FIELDS = set(CreationRequest.model_fields)

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# Lower-case words, minus the few that pydantic reads as floats.
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(lambda w: w not in ("nan", "inf", "infinity"))
not_numbers = st.one_of(words, st.lists(st.integers(), max_size=3), st.dictionaries(words, st.integers(), max_size=2))
not_strings = st.one_of(st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=3), st.dictionaries(words, st.integers(), max_size=2))
non_integral = st.floats(allow_nan=True).filter(lambda f: not f.is_integer())


def _deep(depth: int) -> dict[str, Any]:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


# Each strategy yields changes that break a rule of CreationRequest or of the planner's limits.
_BREAKERS: list[st.SearchStrategy[dict[str, Any]]] = [
    st.builds(lambda v: {"target_count": v}, st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_TARGET_COUNT + 1),
                                                      words, non_integral, st.none())),
    st.builds(lambda v: {"examples_per_call": v}, st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_EXAMPLES_PER_CALL + 1), words)),
    st.builds(lambda v: {"chains": v}, st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_CHAINS + 1))),
    st.builds(lambda v: {"examples_per_call": MAX_EXAMPLES_PER_CALL, "chains": v},
              st.integers(min_value=LIMITS.max_examples_in_flight // MAX_EXAMPLES_PER_CALL + 1, max_value=MAX_CHAINS)),
    st.builds(lambda v: {"instruction": v}, st.one_of(st.just(""), not_strings, st.just("x" * (MAX_INSTRUCTION_CHARS + 1)))),
    st.builds(lambda v: {"formatting_example": v}, st.one_of(st.just({}), st.lists(json_value, max_size=3), st.integers(), st.text(), st.none())),
    st.builds(lambda v: {"formatting_example": _deep(v)}, st.integers(min_value=LIMITS.max_depth + 1, max_value=40)),
    st.builds(lambda k, v: {k: v}, words.filter(lambda k: k not in REQUEST_FIELDS), json_value),
    st.builds(lambda v: {"strategy": v}, st.one_of(words.filter(lambda w: w not in ("none", "random", "contrastive", "similar", "tree")), st.integers())),
    st.builds(lambda v: {"model": {"temperature": v}}, st.one_of(st.floats(max_value=-0.001), st.floats(min_value=2.001, allow_infinity=False), words)),
    st.builds(lambda v: {"model": {"max_tokens": v}}, st.one_of(st.integers(max_value=15), st.integers(min_value=32_769))),
    st.builds(lambda v: {"model": {"endpoint": v}}, words.filter(lambda w: w != "default")),
    st.builds(lambda k: {"model": {k: 1}}, words.filter(lambda k: k not in ("endpoint", "name", "temperature", "max_tokens"))),
    st.builds(lambda v: {"label_field": v}, words.filter(lambda w: w not in SEED)),
    st.builds(lambda v: {"label_field": "answer", "label_space": v}, st.lists(st.integers(), min_size=1, max_size=5)),
    st.builds(lambda v: {"budget": {"max_cost_usd": v}}, st.one_of(st.floats(max_value=0, allow_nan=False), words)),
    st.builds(lambda v: {"budget": {"max_llm_calls": v}}, st.integers(max_value=0)),
    st.builds(lambda v: {"dedup": {"near_duplicate_threshold": v}}, st.one_of(st.floats(min_value=1.001, allow_infinity=False), st.floats(max_value=0, allow_nan=False))),
    st.builds(lambda v: {"kind": v}, st.one_of(words.filter(lambda w: w not in ("create", "cancel")), st.integers())),
    st.builds(lambda v: {"metadata": v}, st.one_of(st.lists(st.integers(), max_size=2), words, st.integers())),
    st.builds(lambda v: {"created_at": v}, words),
    st.builds(lambda v: {"__drop__": v}, st.sampled_from(["instruction", "formatting_example", "target_count"])),
]


@st.composite
def bad_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request dict breaking at least one rule (one to three, drawn from `_BREAKERS`)."""
    raw: dict[str, Any] = {"instruction": "Write quiz questions.", "formatting_example": dict(SEED), "target_count": 5}
    for change in draw(st.lists(st.one_of(*_BREAKERS), min_size=1, max_size=3)):
        change = dict(change)
        if "__drop__" in change:
            raw.pop(change.pop("__drop__"), None)
        for key, value in change.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict) and key != "formatting_example":
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
    return raw


def _dumps(value: Any) -> bytes:
    """JSON of anything drawn: integers beyond 64 bits included, NaN as the (invalid) token NaN."""
    return json.dumps(value).encode()


def _answer(raw: Any) -> str | None:
    """None when the request may run, else the reason it is refused (what the planner does)."""
    try:
        request = decode_request(_dumps(raw))
    except PoisonMessage as exc:
        return str(exc)
    assert isinstance(request, CreationRequest)
    return rejection_reason(request, ENDPOINTS, LIMITS)


@pytest.mark.slow
@hsettings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(bad_requests())
def test_every_broken_request_gets_a_reason(raw):
    reason = _answer(raw)
    assert reason, f"accepted: {raw}"


@pytest.mark.slow
@hsettings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    json_value,
    st.fixed_dictionaries({"instruction": json_value, "formatting_example": json_value, "target_count": json_value},
                          optional={"label_field": json_value, "label_space": json_value, "strategy": json_value,
                                    "examples_per_call": json_value, "model": json_value, "chains": json_value}),
    st.fixed_dictionaries({"instruction": st.text(min_size=1, max_size=50),
                           "formatting_example": st.dictionaries(st.text(max_size=10), json_value, min_size=1, max_size=5),
                           "target_count": st.integers(min_value=1, max_value=100)},
                          optional={"label_field": st.text(max_size=10), "label_space": st.lists(json_leaf, max_size=4)}),
))
def test_any_json_is_a_request_or_a_reason(raw):
    reason = _answer(raw)
    assert reason is None or isinstance(reason, str) and reason


@hsettings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=200))
def test_any_bytes_are_a_request_or_a_poison_message(value):
    try:
        decode_request(value)
    except PoisonMessage as exc:
        assert str(exc)


# ---------------------------------------------------------------------------------------------
# Bad messages of every consumed type, from valid ones by a mutation that always breaks them.


def _unwrap(annotation: Any) -> set[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set(typing.get_args(annotation))
    return {annotation}


def _paths(model: BaseModel, prefix: tuple[Any, ...] = ()) -> tuple[list[tuple], list[tuple], list[tuple], list[tuple]]:
    """Paths (in the JSON dump) of model objects, required fields, number fields and string fields."""
    objects, required, numbers, strings = [prefix], [], [], []
    for name, info in type(model).model_fields.items():
        path = (*prefix, name)
        if info.is_required():
            required.append(path)
        value = getattr(model, name)
        kinds = _unwrap(info.annotation) - {type(None)}
        if isinstance(value, BaseModel):
            parts = _paths(value, path)
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            parts = _paths(value[0], (*path, 0))
        else:
            if kinds and kinds <= {int, float}:
                numbers.append(path)
            elif kinds and all(k is str or isinstance(k, type) and issubclass(k, Enum) for k in kinds):
                strings.append(path)
            continue
        for mine, theirs in zip((objects, required, numbers, strings), parts):
            mine.extend(theirs)
    return objects, required, numbers, strings


def _get(data: Any, path: tuple) -> Any:
    for step in path:
        data = data[step]
    return data


def _message_samples() -> dict[str, BaseModel]:
    task = sample_task("fz-sample")
    return {
        "tasks": task,
        "candidates": Candidate(task=task, endpoint="default", model="m", raw_output="[]", usage=Usage(prompt_tokens=1)),
        "outcomes": TaskOutcome(task_id=task.task_id, request_id=task.request_id, chain=0, step=0, references=task.references),
        "examples": Example(example_id="e", request_id="fz-sample", data=SEED, strategy=task.strategy, reference_ids=[None],
                            task_id=task.task_id, chain=0, step=0, model="m"),
    }


def bad_messages(sample: BaseModel) -> st.SearchStrategy[bytes]:
    objects, required, numbers, strings = _paths(sample)
    base = sample.model_dump(mode="json")

    def mutate(kind: str, path: tuple, value: Any) -> bytes:
        data = orjson.loads(orjson.dumps(base))  # a deep copy
        parent, last = _get(data, path[:-1]) if path else None, path[-1] if path else None
        if kind == "extra":
            _get(data, path)["unexpected_" + str(value)[:10]] = 1
        elif kind == "drop":
            del parent[last]
        else:
            parent[last] = value
        return _dumps(data)

    return st.one_of(
        st.builds(lambda p, v: mutate("extra", p, v), st.sampled_from(objects), words),
        st.builds(lambda p: mutate("drop", p, None), st.sampled_from(required)),
        st.builds(lambda p, v: mutate("set", p, v), st.sampled_from(numbers), not_numbers),
        st.builds(lambda p, v: mutate("set", p, v), st.sampled_from(strings), not_strings),
        st.binary(max_size=100).filter(lambda b: not _is_json(b)),
        st.builds(_dumps, json_value.filter(lambda v: not isinstance(v, dict))),
    )


def _is_json(value: bytes) -> bool:
    try:
        orjson.loads(value)
        return True
    except orjson.JSONDecodeError:
        return False


def generate(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """`count` values drawn by hypothesis's own engine (no shrinking, no example database)."""
    drawn: list[Any] = []

    @hsettings(max_examples=count, database=None, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        drawn.append(value)

    collect()
    return drawn


def test_mutated_messages_of_every_type_are_poison():
    for name, sample in _message_samples().items():
        model = type(sample)
        for value in generate(bad_messages(sample), 300):
            with pytest.raises(PoisonMessage):
                decode(model, value)
        assert decode(model, sample.model_dump_json().encode()) == sample, name


# ---------------------------------------------------------------------------------------------
# Through the bus


async def _wait_until(check: Callable[[], Any], timeout_s: float, every_s: float = 1.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(every_s)


@pytest.mark.slow
async def test_a_thousand_bad_messages_are_all_answered_and_the_services_keep_going(bus_settings, simulator, tmp_path):
    settings = bus_settings.with_updates(
        endpoints_json=endpoint_json(LLMTarget(simulator.base_url, "datacreator-simulator")), max_in_flight=256, **FAST_GROUPS,
    )
    topics = settings.topics
    batch: list[tuple[str, str, bytes]] = []
    for i, raw in enumerate(generate(bad_requests(), 420)):
        request_id = f"fz-req-{i}"
        batch.append((topics.requests, request_id, _dumps({**raw, "request_id": request_id})))
    for name, sample in _message_samples().items():
        for i, value in enumerate(generate(bad_messages(sample), 160)):
            batch.append((getattr(topics, name), f"fz-{name}-{i}", value))
    assert len(batch) >= 1000

    def handlers(name: str, s):
        return SinkHandler(s, directory=tmp_path / "sink", fsync=False) if name == "sink" else build_handler(name, s)

    group = await ServiceGroup(settings, ("planner", "generator", "curator", "sink"), handler_factory=handlers).start()
    producer = make_producer(settings, linger_ms=0)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key.encode()) for topic, key, value in batch]
        sent = {(m.topic, m.partition, m.offset): key for m, (_, key, _) in zip(await asyncio.gather(*futures), batch)}
        poison_sent = {where for where in sent if where[0] != topics.requests}
        request_ids = {key for (topic, _, _), key in sent.items() if topic == topics.requests}

        letters: dict[tuple, DeadLetter] = {}
        statuses: dict[str, RequestStatus] = {}

        async def all_answered() -> bool:
            async for record in read_to_end(settings, topics.dlq):
                letter = decode(DeadLetter, record.value)
                letters[(letter.source_topic, letter.partition, letter.offset)] = letter
            async for record in read_to_end(settings, topics.status):
                status = decode(RequestStatus, record.value)
                statuses[status.request_id] = status
            return poison_sent <= letters.keys() and request_ids <= statuses.keys()

        assert await _wait_until(all_answered, timeout_s=90), (
            f"unanswered: {len(poison_sent - letters.keys())} poison, {len(request_ids - statuses.keys())} requests"
        )
        for where in poison_sent:
            letter = letters[where]
            assert letter.error and letter.error_type == "PoisonMessage"
        for request_id in request_ids:
            assert statuses[request_id].state == RequestState.REJECTED and statuses[request_id].error
        # Every dead-lettered request has a REJECTED status with the same reason.
        for letter in letters.values():
            if letter.source_topic == topics.requests:
                assert statuses[letter.key].error == letter.error
        assert all(runner.state.running for runner in group.runners)

        request = CreationRequest(instruction="Write quiz questions about nature.", formatting_example=SEED,
                                  target_count=5, examples_per_call=5, chains=1)
        await remote.submit(settings, request)
        final = await remote.wait_for_final(settings, request.request_id, timeout_s=60)
        assert final.state == RequestState.COMPLETED and final.accepted == 5
    finally:
        await producer.stop()
        await group.stop()

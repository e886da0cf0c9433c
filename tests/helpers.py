"""Factories and read-back helpers shared by the tests (no test module imports another)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel

from datacreator.bus.codec import decode
from datacreator.bus.readback import read_to_end
from datacreator.config import Settings
from datacreator.contracts import (
    Candidate,
    DedupSpec,
    Example,
    GenerationTask,
    ModelSpec,
    Reference,
    Strategy,
    Usage,
)
from datacreator.logic.shape import example_schema, infer_label

M = TypeVar("M", bound=BaseModel)

MCQ = {
    "question": "Where would you most likely keep frozen peas?",
    "options": {"A": "In a bookshelf", "B": "In a freezer", "C": "In a garden shed", "D": "In a car glovebox"},
    "answer": "B",
}
MCQ_INSTRUCTION = "Create commonsense multiple-choice questions with options A to D."


async def records_of(settings: Settings, topic: str, model: type[M], request_id: str) -> list[M]:
    """Every message of the request on the topic, redeliveries included.

    Unlike `client.read_messages`, nothing is dropped: a redelivery stays (tests count them) and
    a record that does not decode fails the test.
    """
    out = []
    async for record in read_to_end(settings, topic):
        message = decode(model, record.value)
        if message.request_id == request_id:
            out.append(message)
    return out


async def example_records(settings: Settings, request_id: str) -> list[Example]:
    return await records_of(settings, settings.topics.examples, Example, request_id)


# -- a quiz request's tasks and candidates, for the curator's rules ------------------------------

SEED = {"question": "Which planet is the largest?", "options": {"A": "Mars", "B": "Jupiter", "C": "Venus", "D": "Earth"}, "answer": "B"}
TOPICS = ["volcano", "glacier", "desert", "rainforest", "coral reef", "tundra", "savanna", "canyon", "delta", "fjord",
          "prairie", "lagoon"]


def item(n: int, answer: str = "A") -> dict:
    topic = TOPICS[n % len(TOPICS)]
    return {
        "question": f"Question {n}: which statement about the {topic} number {n} is true for students of grade {n % 7}?",
        "options": {"A": f"{topic} fact {n}", "B": f"{topic} myth {n}", "C": f"unrelated {n}", "D": f"none {n}"},
        "answer": answer,
    }


def make_task(task_id: str = "t-0", *, request_id: str = "req-1", target: int = 100, references: list[Reference] | None = None,
              step: int = 0, dedup: DedupSpec | None = None, seed: dict[str, Any] | None = None, **fields: Any) -> GenerationTask:
    """The one GenerationTask factory of the tests: a task made from `seed` (the quiz SEED by default),
    its schema and label inferred from the seed as the planner does; any other field can be given."""
    seed = SEED if seed is None else seed
    field, space = infer_label(seed)
    values: dict[str, Any] = {
        "task_id": task_id, "request_id": request_id, "chain": 0, "step": step, "strategy": Strategy.random,
        "instruction": "Write quiz questions.", "references": references or [Reference(data=seed)], "num_examples": 5,
        "target_count": target, "example_schema": example_schema(seed, field, space), "label_field": field,
        "label_space": space, "dedup": dedup or DedupSpec(), "model": ModelSpec(),
    }
    values.update(fields)
    return GenerationTask(**values)


def candidate(task: GenerationTask, items: list[Any] | None = None, raw: str | None = None, **extra: Any) -> Candidate:
    if raw is None and "error" not in extra:
        raw = "```json\n" + json.dumps({"examples": items}) + "\n```"
    return Candidate(task=task, endpoint="default", model="sim-1", raw_output=raw,
                     usage=Usage(prompt_tokens=100, completion_tokens=50), cost_usd=0.001, latency_s=0.5, **extra)


def rejection_reason(request, endpoints: set[str] | None, limits) -> str | None:
    """validate_request's reason for refusing `request`, or None when it would run."""
    from datacreator.logic.planning import RequestRejected, validate_request

    try:
        validate_request(request, endpoints, limits)
    except RequestRejected as exc:
        return str(exc)
    return None

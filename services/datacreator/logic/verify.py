"""Label checks: a blind verifier labels each created input, and its label decides the item's fate.

Pure parts only: which items of an answer to check, the verification prompt (the created label is
removed from every item, the label space is listed), the response format, reading the verifier's
answer, and the agree / reject / relabel decision the curator applies.

A verifier answer that cannot be read (not JSON, wrong length, a value outside the label space)
leaves its items *unverified*: they are kept as created and counted apart, never taken as
disagreements, so a flaky verifier cannot empty a request.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from datacreator.contracts import (
    Candidate,
    GenerationTask,
    RejectReason,
    VerifyMode,
    VerifyTally,
)
from datacreator.logic.parsing import parse_examples
from datacreator.logic.prompt import estimate_text_tokens
from datacreator.logic.validation import ExampleValidator, _label_key, _schema_at

# The simulator (and anyone reading logs) tells a verification call from a generation call by it.
VERIFY_SYSTEM_PROMPT = "You check the labels of training data. Answer with JSON only."
VERIFY_SCHEMA_NAME = "labels"
_MISSING = object()


def label_name(value: Any) -> str:
    """A label as a status key: strings as they are, anything else as JSON (true, 3)."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def task_validator(task: GenerationTask, max_field_chars: int = 5000) -> ExampleValidator:
    """The validator the curator builds for a task's request (the same checks, the same keys)."""
    if task.example_schema:
        return ExampleValidator.from_schema(
            task.example_schema, task.label_field, task.label_space, task.allow_extra_keys or None, max_field_chars
        )
    return ExampleValidator(task.references[0].data, task.label_field, task.label_space, task.allow_extra_keys, max_field_chars)


def get_label(item: Any, label_field: str) -> Any:
    node = item
    for part in label_field.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def with_label(item: dict, label_field: str, value: Any) -> dict:
    """A copy of `item` whose label is `value`."""
    out = copy.deepcopy(item)
    node = out
    parts = label_field.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return out


def blind(item: dict, label_field: str) -> dict:
    """A copy of `item` without its label: what the verifier sees."""
    out = copy.deepcopy(item)
    node: Any = out
    parts = label_field.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(parts[-1], None)
    return out


# -- which items ------------------------------------------------------------------------------


@dataclass(slots=True)
class Targets:
    """The items of one answer to check: `parsed` items in all, `indexes` of the checkable ones."""

    parsed: int
    indexes: list[int] = field(default_factory=list)
    items: list[dict] = field(default_factory=list)


def verify_targets(task: GenerationTask, raw_output: str | None, validator: ExampleValidator | None = None) -> Targets:
    """Items of the answer that pass the structural and label checks; indexes match the curator's parse."""
    validator = validator or task_validator(task)
    keys = frozenset(validator.top_level_keys) or None
    parsed = parse_examples(raw_output, keys)
    targets = Targets(parsed=len(parsed.items))
    if not task.label_field:
        return targets
    for index, item in enumerate(parsed.items):
        if validator.validate(item) is None:
            targets.indexes.append(index)
            targets.items.append(item)
    return targets


# -- the verification call ------------------------------------------------------------------------


def label_space(task: GenerationTask) -> list[Any] | None:
    """The task's label space: given, inferred, or the label's `enum` in the example schema."""
    if task.label_space:
        return list(task.label_space)
    if task.label_field and task.example_schema:
        node = _schema_at(task.example_schema, task.label_field.split("."))
        if node is not None and isinstance(node.get("enum"), list):
            return list(node["enum"])
        if node is not None and node.get("type") == "boolean":
            return [True, False]
    return None


def build_verify_messages(task: GenerationTask, items: list[dict]) -> list[dict[str, str]]:
    """One call for every item: the task, each item without its label, the labels to choose from."""
    assert task.label_field, "label checks need a label field"
    name = task.label_field
    space = label_space(task)
    n = len(items)
    parts = [f"The task these items were written for:\n{task.instruction.strip()}"]
    parts.append(f'Here are {n} items of that task, each with its "{name}" field removed.')
    for number, item in enumerate(items, 1):
        parts.append(f"Item {number}:\n```json\n{json.dumps(blind(item, name), ensure_ascii=False)}\n```")
    if space:
        values = ", ".join(json.dumps(v, ensure_ascii=False) for v in space)
        choose = f'For each item, give the "{name}" that is correct for its content, one of: {values}.'
    else:
        choose = f'For each item, give the "{name}" that is correct for its content (one of the item\'s own options).'
    parts.append(
        choose + " Judge only the item itself; pick the closest value when none fits well. "
        f'Return one JSON object: {{"labels": [...]}} with exactly {n} values, one per item, in order.'
    )
    return [{"role": "system", "content": VERIFY_SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]


def labels_schema(task: GenerationTask, n: int) -> dict[str, Any]:
    """The answer's JSON Schema: exactly `n` labels, each from the label space where it is known."""
    space = label_space(task)
    if space:
        item: dict[str, Any] = {"enum": space}
    else:
        node = _schema_at(task.example_schema, (task.label_field or "").split(".")) if task.example_schema else None
        item = {k: v for k, v in (node or {}).items() if k in ("type", "enum")}
    return {
        "type": "object",
        "properties": {"labels": {"type": "array", "items": item, "minItems": n, "maxItems": n}},
        "required": ["labels"],
        "additionalProperties": False,
    }


def verify_response_format(task: GenerationTask, n: int, mode: str) -> dict[str, Any] | None:
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": VERIFY_SCHEMA_NAME, "strict": True, "schema": labels_schema(task, n)}}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


def verify_max_tokens(task: GenerationTask, n: int) -> int:
    """Room for `n` of the longest label plus the JSON around them: a fraction of a generation call."""
    space = label_space(task) or []
    longest = max((len(json.dumps(v, ensure_ascii=False)) for v in space), default=16)
    return max(32, min(task.model.max_tokens, 16 + n * (estimate_text_tokens("x" * longest) + 4)))


def verify_task(task: GenerationTask, n: int) -> GenerationTask:
    """The task as the verification call sees it: the verifier's endpoint, greedy sampling, a short answer."""
    alias = task.verify_endpoint or task.model.endpoint
    same = alias == task.model.endpoint
    model = task.model.model_copy(update={
        "endpoint": alias, "name": task.model.name if same else None, "temperature": 0.0,
        "max_tokens": verify_max_tokens(task, n),
    })
    return task.model_copy(update={"model": model})


# -- the answer ---------------------------------------------------------------------------------


def _match(value: Any, space: list[Any] | None) -> Any:
    """The label-space value the answer means, or _MISSING; "B" for "b" or " B", true for "true"."""
    if space is None:
        return value if isinstance(value, (str, int, float, bool)) else _MISSING
    try:
        key = _label_key(value)
    except TypeError:
        return _MISSING
    for option in space:
        if _label_key(option) == key:
            return option
    if isinstance(value, str):
        text = value.strip().strip('"').casefold()
        for option in space:
            if label_name(option).casefold() == text:
                return option
    return _MISSING


def parse_verifier_answer(text: str | None, n: int, space: list[Any] | None) -> list[Any]:
    """`n` labels from the verifier's answer, None where a label cannot be read.

    An answer of the wrong length cannot be aligned with the items: every entry is None.
    """
    unread: list[Any] = [None] * n
    if text is None:
        return unread
    parsed = parse_examples(text, ("labels",))
    values: Any = None
    for item in parsed.items:
        if isinstance(item, dict) and isinstance(item.get("labels"), list):
            values = item["labels"]
            break
    if values is None and parsed.items and not any(isinstance(i, (dict, list)) for i in parsed.items):
        values = parsed.items  # a bare list of labels
    if values is None or len(values) != n:
        return unread
    out = []
    for value in values:
        matched = _match(value, space)
        out.append(None if matched is _MISSING else matched)
    return out


# -- the decision -----------------------------------------------------------------------------


class Decision(StrEnum):
    unverified = "unverified"
    agree = "agree"
    reject = "reject"
    relabel = "relabel"


def decide(created: Any, verified: Any, mode: VerifyMode) -> Decision:
    """What the verifier's label (None: none could be read) does to an item of the created label."""
    if mode is VerifyMode.off or verified is None:
        return Decision.unverified
    try:
        same = _label_key(created) == _label_key(verified)
    except TypeError:
        same = False
    if same:
        return Decision.agree
    return Decision.reject if mode is VerifyMode.reject else Decision.relabel


@dataclass(slots=True)
class Checked:
    """What the curator does with one item: `item` (maybe relabelled), a rejection detail, its Example marks."""

    item: Any
    rejection: str | None = None
    marks: dict[str, Any] = field(default_factory=dict)


class LabelChecks:
    """One candidate's verifier labels, applied item by item during curation, and their tally."""

    reason = RejectReason.label_disagreement

    def __init__(self, candidate: Candidate, validator: ExampleValidator) -> None:
        task = candidate.task
        self.mode = task.verify
        self.field = task.label_field
        self.validator = validator
        verification = candidate.verification
        self.labels: list[Any] = list(verification.labels) if verification is not None else []
        self.tally: VerifyTally | None = None
        if verification is not None and self.mode is not VerifyMode.off:
            self.tally = VerifyTally(calls=verification.calls, usage=verification.usage, cost_usd=verification.cost_usd)
        self._checked: Counter[str] = Counter()
        self._disagreed: Counter[str] = Counter()

    def apply(self, index: int, item: Any) -> Checked:
        """Item `index` of the parsed answer, already valid: agree, reject or relabel it."""
        if self.tally is None or not self.field:
            return Checked(item)
        created = get_label(item, self.field)
        verified = self.labels[index] if index < len(self.labels) else None
        decision = decide(created, verified, self.mode)
        if decision is Decision.unverified:
            self.tally.unverified += 1
            return Checked(item)
        name = label_name(created)
        self._checked[name] += 1
        if decision is Decision.agree:
            return Checked(item, marks={"verified": True})
        self._disagreed[name] += 1
        if decision is Decision.reject:
            return Checked(item, rejection=f"{self.field}: created {label_name(created)}, verifier says {label_name(verified)}")
        relabelled = with_label(item, self.field, verified)
        if self.validator.validate(relabelled) is not None:  # e.g. not one of this item's own options
            self._checked[name] -= 1
            self._disagreed[name] -= 1
            self.tally.unverified += 1
            return Checked(item)
        return Checked(relabelled, marks={"verified": True, "relabelled_from": created})

    def result(self) -> VerifyTally | None:
        if self.tally is None:
            return None
        self.tally.checked = {k: v for k, v in sorted(self._checked.items()) if v}
        self.tally.disagreed = {k: v for k, v in sorted(self._disagreed.items()) if v}
        return self.tally


def add_tally(counts: Any, tally: VerifyTally) -> None:
    """Fold one task's tally into running totals with the `verify_*` attributes of a status."""
    counts.verify_calls += tally.calls
    counts.verify_prompt_tokens += tally.usage.prompt_tokens
    counts.verify_completion_tokens += tally.usage.completion_tokens
    counts.verify_cost_usd += tally.cost_usd
    counts.verify_unverified += tally.unverified
    for name, part in (("verify_checked", tally.checked), ("verify_disagreements", tally.disagreed)):
        merged = dict(getattr(counts, name))
        for label, n in part.items():
            merged[label] = merged.get(label, 0) + n
        setattr(counts, name, merged)


def disagreement_shares(checked: dict[str, int], disagreed: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per created label: checked, disagreed, and the disagreement share (for the quality report)."""
    out: dict[str, dict[str, Any]] = {}
    for label in sorted(set(checked) | set(disagreed)):
        total = checked.get(label, 0)
        bad = disagreed.get(label, 0)
        out[label] = {"checked": total, "disagreed": bad, "share": round(bad / total, 4) if total else None}
    return out

"""What the simulator answers: N examples shaped by a JSON Schema or by the formatting example.

The prompt format is the project's own (`datacreator.logic.prompt`): the last user message holds
the formatting example(s) in ```json fences and asks to "Write exactly N new examples"; the answer
is one JSON object `{"examples": [...]}`.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from datacreator.logic.shape import json_type

from . import text

DEFAULT_COUNT = 5
MAX_COUNT = 200
MAX_DEPTH = 12

_FENCE = re.compile(r"```json[ \t]*\n?(.*?)```", re.S | re.I)
_COUNT = re.compile(r"exactly (\d+) new examples", re.I)
_LABEL_KEY = re.compile(r"answer|label|correct|gold|target|class|category", re.I)
_LABEL_SENTENCE = re.compile(r'The "([^"]+)" field must be one of: ')
_PLAN_SENTENCE = re.compile(r'The "([^"]+)" of the \d+ examples, in order: ')
_OPTION_NAMES = frozenset({"options", "choices", "candidates", "alternatives"})
_NUMERIC = re.compile(r"^[\d\s.,:/+-]+$")
_MISSING: Any = object()


def estimate_tokens(chars: int) -> int:
    """Tokens as the simulator counts them: ceil(chars / 4)."""
    return math.ceil(chars / 4)


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts with `text`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def prompt_chars(messages: list[Any]) -> int:
    return sum(len(content_text(m.get("content"))) for m in messages if isinstance(m, dict))


@dataclass
class Prompt:
    """What the simulator reads from a chat request."""

    count: int = DEFAULT_COUNT
    examples: list[Any] = field(default_factory=list)  # the last fenced block: the structure to follow
    references: list[Any] = field(default_factory=list)  # every fenced block: what a copy fault copies
    label_field: str | None = None
    label_space: list[Any] | None = None
    planned_field: str | None = None
    planned_labels: list[Any] | None = None  # the label plan: one label per item, in order

    @classmethod
    def read(cls, messages: list[Any]) -> Prompt:
        user = next(
            (content_text(m.get("content")) for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
            "",
        )
        prompt = cls()
        if match := _COUNT.search(user):
            prompt.count = max(1, min(MAX_COUNT, int(match.group(1))))
        for block in _FENCE.findall(user):
            try:
                prompt.examples = _unwrap_examples(orjson.loads(block))
            except orjson.JSONDecodeError:
                continue
            prompt.references += prompt.examples
        if match := _LABEL_SENTENCE.search(user):
            prompt.label_field, prompt.label_space = match.group(1), _json_list(user, match.end())
        if match := _PLAN_SENTENCE.search(user):
            prompt.planned_field, prompt.planned_labels = match.group(1), _json_list(user, match.end())
        return prompt


def _json_list(text_: str, pos: int) -> list[Any] | None:
    """JSON values separated by ', ' from `pos` on (the label sentence's list)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    while True:
        try:
            value, pos = decoder.raw_decode(text_, pos)
        except json.JSONDecodeError:
            break
        values.append(value)
        if not text_.startswith(", ", pos):
            break
        pos += 2
    return values or None


def _unwrap_examples(parsed: Any) -> list[Any]:
    if isinstance(parsed, dict) and list(parsed) == ["examples"] and isinstance(parsed["examples"], list) and parsed["examples"]:
        return list(parsed["examples"])
    if isinstance(parsed, list) and parsed:
        return list(parsed)
    return [parsed]


# ---------------------------------------------------------------------------------------------
# Items from a JSON Schema


def schema_types(schema: Any) -> set[str] | None:
    """JSON types a schema accepts, or None when it cannot say."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return {json_type(schema["const"])}
    if "enum" in schema:
        return {json_type(v) for v in schema["enum"]}
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return set(declared)
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        found: set[str] = set()
        for option in options:
            sub = schema_types(option)
            if sub is None:
                return None
            found |= sub
        return found
    if "properties" in schema:
        return {"object"}
    if "items" in schema:
        return {"array"}
    return None


class SchemaWriter:
    """Values valid against a JSON Schema subset, shaped like an example value when one is given."""

    def __init__(self, rng: random.Random, root: dict[str, Any]):
        self.rng = rng
        self.root = root

    def resolve(self, schema: Any) -> Any:
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        target: Any = self.root
        for part in ref[2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, dict) else {}
        return target

    def value(self, schema: Any, example: Any = _MISSING, depth: int = 0) -> Any:
        schema = self.resolve(schema)
        rng = self.rng
        if not isinstance(schema, dict) or not schema:
            return imitate(rng, example) if example is not _MISSING else text.text(rng, rng.randint(30, 90))
        if "const" in schema:
            return copy.deepcopy(schema["const"])
        if "enum" in schema and schema["enum"]:
            return copy.deepcopy(rng.choice(schema["enum"]))
        if "allOf" in schema:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                merged.update(self.resolve(part))
            return self.value(merged, example, depth + 1)
        options = schema.get("anyOf") or schema.get("oneOf")
        if options:
            return self.value(self._pick_option(options, example), example, depth + 1)
        kind = self._pick_type(schema, example)
        if depth > MAX_DEPTH and kind in ("object", "array"):
            kind = "null" if "null" in (schema_types(schema) or ()) else kind
        return self._writers[kind](self, schema, example, depth)

    def _pick_option(self, options: list[Any], example: Any) -> Any:
        if example is not _MISSING:
            wanted = json_type(example)
            fitting = [o for o in options if wanted in (schema_types(self.resolve(o)) or ())]
            if fitting and self.rng.random() < 0.85:
                return self.rng.choice(fitting)
        return self.rng.choice(options)

    def _pick_type(self, schema: dict[str, Any], example: Any) -> str:
        declared = schema.get("type")
        if isinstance(declared, list) and declared:
            if example is not _MISSING and json_type(example) in declared and self.rng.random() < 0.85:
                return json_type(example)
            non_null = [t for t in declared if t != "null"]
            if non_null and (len(non_null) == len(declared) or self.rng.random() < 0.85):
                return self.rng.choice(non_null)
            return self.rng.choice(declared)
        if isinstance(declared, str):
            return declared
        if "properties" in schema:
            return "object"
        if "items" in schema:
            return "array"
        return json_type(example) if example is not _MISSING else "string"

    def _object(self, schema: dict[str, Any], example: Any, depth: int) -> dict[str, Any]:
        example = example if isinstance(example, dict) else {}
        properties: dict[str, Any] = schema.get("properties") or {}
        out = {key: self.value(sub, example.get(key, _MISSING), depth + 1) for key, sub in properties.items()}
        for key in schema.get("required") or ():
            if key not in out:
                out[key] = imitate(self.rng, example[key]) if key in example else text.text(self.rng, 40)
        return out

    def _array(self, schema: dict[str, Any], example: Any, depth: int) -> list[Any]:
        low = int(schema.get("minItems", 0))
        high = schema.get("maxItems")
        size = len(example) if isinstance(example, list) else self.rng.randint(1, 3)
        size = max(low, size if high is None else min(int(high), size))
        items = schema.get("items", {})
        out: list[Any] = []
        for i in range(size):
            sample = example[i % len(example)] if isinstance(example, list) and example else _MISSING
            value = self.value(items, sample, depth + 1)
            if schema.get("uniqueItems"):
                for _ in range(20):
                    if value not in out:
                        break
                    value = self.value(items, sample, depth + 1)
            out.append(value)
        return out

    def _string(self, schema: dict[str, Any], example: Any, depth: int) -> str:
        low = int(schema.get("minLength", 0))
        high = schema.get("maxLength")
        if isinstance(example, str) and example:
            if _NUMERIC.match(example) and low <= len(example) <= (high if high is not None else len(example)):
                return text.numeric_text(self.rng, example)
            target = len(example)
        else:
            target = self.rng.randint(max(low, 30), max(low, 30) + 70)
        return text.text(self.rng, target, low, int(high) if high is not None else None)

    def _number(self, schema: dict[str, Any], example: Any, depth: int, integer: bool = False) -> float | int:
        low, high = _bounds(schema, example, integer)
        if integer:
            return self.rng.randint(math.ceil(low), math.floor(high))
        return round(self.rng.uniform(low, high), 2) if high - low > 0.02 else low

    def _integer(self, schema: dict[str, Any], example: Any, depth: int) -> int:
        return int(self._number(schema, example, depth, integer=True))

    def _boolean(self, schema: dict[str, Any], example: Any, depth: int) -> bool:
        return self.rng.random() < 0.5

    def _null(self, schema: dict[str, Any], example: Any, depth: int) -> None:
        return None

    _writers: dict[str, Callable[..., Any]] = {
        "object": _object,
        "array": _array,
        "string": _string,
        "integer": _integer,
        "number": _number,
        "boolean": _boolean,
        "null": _null,
    }


def _bounds(schema: dict[str, Any], example: Any, integer: bool) -> tuple[float, float]:
    step = 1 if integer else 0.01
    if isinstance(example, (int, float)) and not isinstance(example, bool):
        spread = max(10.0, abs(example))
        low, high = example - spread if example < 0 else 0.0, example + spread
    else:
        low, high = 0.0, 100.0
    if "minimum" in schema:
        low = max(low, schema["minimum"]) if "maximum" not in schema or schema["minimum"] <= high else schema["minimum"]
    if "exclusiveMinimum" in schema:
        low = max(low, schema["exclusiveMinimum"] + step)
    if "maximum" in schema:
        high = schema["maximum"]
    if "exclusiveMaximum" in schema:
        high = schema["exclusiveMaximum"] - step
    if high < low:
        high = low + (100 if "maximum" not in schema and "exclusiveMaximum" not in schema else 0)
        low = min(low, high)
    return low, high


# ---------------------------------------------------------------------------------------------
# Items from the formatting example


def imitate(rng: random.Random, example: Any, key: str = "") -> Any:
    """A new value of the same structure as `example`: same keys, same types, new text.

    Label-like scalars stay as shown: their space is unknown here (`tie_labels` draws them).
    """
    if isinstance(example, dict):
        return {k: imitate(rng, v, k) for k, v in example.items()}
    if isinstance(example, list):
        return [imitate(rng, value) for value in example]
    if isinstance(example, bool):
        return rng.random() < 0.5
    if key and _LABEL_KEY.search(key) and (isinstance(example, int) or (isinstance(example, str) and len(example) <= 40)):
        return example
    if isinstance(example, int):
        spread = max(10, abs(example))
        return rng.randint(min(0, example - spread), example + spread)
    if isinstance(example, float):
        spread = max(10.0, abs(example))
        return round(rng.uniform(min(0.0, example - spread), example + spread), 2)
    if isinstance(example, str):
        if example and _NUMERIC.match(example):
            return text.numeric_text(rng, example)
        return text.text(rng, len(example))
    return copy.deepcopy(example)


Path = tuple[Any, ...]


@dataclass(frozen=True)
class LabelSlot:
    """Where a label sits and what its space is.

    kind: "keys" (a key of the options dict at `holder`), "items" (an item of the options list at
    `holder`), "index" (an index into it), "space" (one of `space`), "seen" (only the example's value known).
    """

    path: Path
    kind: str
    holder: Path = ()
    space: tuple[Any, ...] = ()

    def choices(self, item: Any) -> list[Any]:
        if self.kind in ("space", "seen"):
            return list(self.space)
        holder = get_path(item, self.holder)
        if self.kind == "keys" and isinstance(holder, dict):
            return list(holder)
        if self.kind == "items" and isinstance(holder, list):
            return [v for v in holder if isinstance(v, (str, int, float))]
        if self.kind == "index" and isinstance(holder, list):
            return list(range(len(holder)))
        return []


def get_path(data: Any, path: Path) -> Any:
    for step in path:
        if isinstance(data, dict) and step in data:
            data = data[step]
        elif isinstance(data, list) and isinstance(step, int) and 0 <= step < len(data):
            data = data[step]
        else:
            return _MISSING
    return data


def _dotted(field_: str) -> Path:
    return tuple(int(part) if part.isdigit() else part for part in field_.split("."))


def label_slots(example: Any, prompt: Prompt | None = None) -> list[LabelSlot]:
    """The labels of an example: named like a label, pointing into an options dict or list."""
    slots: list[LabelSlot] = []
    stated = _dotted(prompt.label_field) if prompt and prompt.label_field and prompt.label_space else None
    if stated:
        slots.append(LabelSlot(stated, "space", space=tuple(prompt.label_space or ())))  # type: ignore[union-attr]

    def walk(obj: Any, path: Path) -> None:
        if isinstance(obj, list):
            for i, value in enumerate(obj):
                walk(value, path + (i,))
            return
        if not isinstance(obj, dict):
            return
        for key, value in obj.items():
            here = path + (key,)
            if here == stated:
                continue
            if _LABEL_KEY.search(key) and isinstance(value, (str, int)) and not isinstance(value, bool):
                slot = _slot_for(here, value, obj, path, example)
                if slot is not None:
                    slots.append(slot)
                    continue
            walk(value, here)

    walk(example, ())
    return slots


def _slot_for(here: Path, value: Any, siblings: dict[str, Any], parent: Path, top: Any) -> LabelSlot | None:
    holders = [(parent + (k,), v) for k, v in siblings.items() if parent + (k,) != here]
    if isinstance(top, dict) and parent:
        holders += [((k,), v) for k, v in top.items()]
    for where, holder in holders:
        if isinstance(value, str) and isinstance(holder, dict) and value in holder:
            return LabelSlot(here, "keys", where)
    for where, holder in holders:
        if not isinstance(holder, list) or not holder or where[-1] not in _OPTION_NAMES:
            continue
        if value in holder:
            return LabelSlot(here, "items", where)
        if isinstance(value, int) and 0 <= value < len(holder) and not any(isinstance(o, int) for o in holder):
            return LabelSlot(here, "index", where)
    if isinstance(value, str) and len(value) > 40:
        return None  # long text named like an answer: free text, not a label
    return LabelSlot(here, "seen", space=(value,))


def tie_labels(rng: random.Random, item: Any, slots: list[LabelSlot], skip: set[Path] = frozenset()) -> None:
    """Draw each label uniformly from its space, as it stands in `item` (its own options)."""
    for slot in slots:
        if slot.path in skip or slot.kind == "seen":
            continue
        choices = slot.choices(item)
        if choices:
            _set_path(item, slot.path, rng.choice(choices))


def const_paths(schema: Any, writer: SchemaWriter, path: Path = (), depth: int = 0) -> Iterator[Path]:
    """Where an object schema fixes a value (`const`): a label pinned for this position."""
    schema = writer.resolve(schema)
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return
    if "const" in schema and path:
        yield path
        return
    for key, sub in (schema.get("properties") or {}).items():
        yield from const_paths(sub, writer, path + (key,), depth + 1)


def enum_slots(schema: Any, writer: SchemaWriter, path: Path = (), depth: int = 0) -> Iterator[LabelSlot]:
    """The enum-valued properties of an object schema: its labels, with their spaces."""
    schema = writer.resolve(schema)
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return
    if isinstance(schema.get("enum"), list) and path:
        yield LabelSlot(path, "space", space=tuple(schema["enum"]))
        return
    for key, sub in (schema.get("properties") or {}).items():
        yield from enum_slots(sub, writer, path + (key,), depth + 1)


# ---------------------------------------------------------------------------------------------
# Item faults


_WRONG_VALUES: list[tuple[str, Any]] = [
    ("string", "a value of the wrong type"),
    ("integer", 12345),
    ("array", ["a", "list"]),
    ("object", {"unexpected": "object"}),
]


def _wrong_value(allowed: set[str] | None, current: Any) -> Any:
    if allowed is None:
        allowed = {json_type(current)}
    if "number" in allowed:
        allowed = allowed | {"integer"}
    for kind, value in _WRONG_VALUES:
        if kind not in allowed:
            return copy.deepcopy(value)
    return True if "boolean" not in allowed else None


def break_structure(rng: random.Random, item: Any, item_schema: dict[str, Any] | None, writer: SchemaWriter | None) -> Any:
    """The item with one key missing or one value of a wrong type."""
    if not isinstance(item, dict) or not item:
        return "not an example"
    schema = writer.resolve(item_schema) if writer and item_schema else None
    properties = (schema or {}).get("properties") or {}
    required = [k for k in (schema or {}).get("required") or () if k in item]
    broken = dict(item)
    if schema is None:
        key = rng.choice(list(item))
        if rng.random() < 0.5 and len(item) > 1:
            del broken[key]
        else:
            broken[key] = _wrong_value(None, item[key])
        return broken
    typed = [k for k in item if k in properties and schema_types(writer.resolve(properties[k])) is not None]  # type: ignore[union-attr]
    moves = (["drop"] if required else []) + (["retype"] if typed else [])
    if not moves:
        return "not an example"
    if rng.choice(moves) == "drop":
        del broken[rng.choice(required)]
    else:
        key = rng.choice(typed)
        broken[key] = _wrong_value(schema_types(writer.resolve(properties[key])), item[key])  # type: ignore[union-attr]
    return broken


def _outside(space: list[Any], rng: random.Random) -> Any:
    if space and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in space):
        return max(space) + 1
    if space and all(isinstance(v, str) and len(v) == 1 and v.isupper() for v in space):
        free = [c for c in string.ascii_uppercase if c not in space]
        if free:
            return rng.choice(free)
    for outside in ("other", "none of the above", "unknown label", "out-of-space label"):
        if outside not in space:
            return outside
    return "label-" + "".join(rng.choices(string.ascii_lowercase, k=8))


def _set_path(item: Any, path: tuple[Any, ...], value: Any) -> bool:
    target = item
    for step in path[:-1]:
        try:
            target = target[step]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(target, dict) or (isinstance(target, list) and isinstance(path[-1], int) and path[-1] < len(target)):
        target[path[-1]] = value
        return True
    return False


def label_out_of_space(rng: random.Random, item: Any, slots: list[LabelSlot]) -> Any | None:
    """The item with one label outside its space; None when it has no label."""
    if not slots or not isinstance(item, dict):
        return None
    slot = rng.choice(slots)
    space = slot.choices(item)
    if slot.kind == "index":
        value: Any = len(space)
    else:
        value = _outside(space, rng)
    broken = copy.deepcopy(item)
    return broken if _set_path(broken, slot.path, value) else None


# ---------------------------------------------------------------------------------------------
# The answer


@dataclass
class Faults:
    """Item-level fault shares, and the counts of what was injected."""

    wrong_structure_rate: float = 0.0
    label_out_of_space_rate: float = 0.0
    copy_rate: float = 0.0
    injected: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1


def write_examples(rng: random.Random, messages: list[Any], response_format: Any, faults: Faults) -> str:
    """The answer text: `{"examples": [...]}` with the requested number of items."""
    prompt = Prompt.read(messages)
    root, item_schema, low, high = _schema_of(response_format)
    positions = _positions(root)
    if positions:
        item_schema = positions[0]
    writer = SchemaWriter(rng, root) if root is not None else None
    if writer is not None and item_schema is None:  # a schema not of the usual shape: answer it whole
        return orjson.dumps(writer.value(root)).decode()
    count = max(low or 0, prompt.count if high is None else min(high, prompt.count))
    seen = prompt.examples
    shape = seen[0] if seen else _MISSING
    if writer is not None:
        items = [
            writer.value(positions[i % len(positions)] if positions else item_schema, seen[i % len(seen)] if seen else _MISSING)
            for i in range(count)
        ]
        enums = list(enum_slots(item_schema, writer))
        pinned = set(const_paths(item_schema, writer)) if positions else set()
        fixed = {slot.path for slot in enums} | pinned
        # A pinned label still has a space, for the label_out_of_space fault: what the prompt states, or every position's.
        for path in pinned:
            space = list(prompt.label_space or ()) if prompt.label_field and _dotted(prompt.label_field) == path else []
            space += [v for v in (get_path(item, path) for item in items) if v is not _MISSING and v not in space]
            enums.append(LabelSlot(path, "space", space=tuple(space)))
        slots = enums + [s for s in label_slots(shape) if s.path not in fixed and s.kind != "seen"] if seen else enums
    elif seen:
        items = [imitate(rng, seen[i % len(seen)]) for i in range(count)]
        slots = label_slots(shape, prompt)
        fixed = set()
    else:
        items = [{"text": text.text(rng, 80)} for _ in range(count)]
        slots, fixed = [], set()
    for item in items:
        tie_labels(rng, item, slots, fixed)
    if not positions and prompt.planned_field and prompt.planned_labels:
        # No per-position schema (JSON mode, plain prompting): follow the plan the prompt states.
        where = _dotted(prompt.planned_field)
        for item, label in zip(items, prompt.planned_labels):
            _set_path(item, where, copy.deepcopy(label))
    for i, item in enumerate(items):
        if faults.copy_rate and seen and rng.random() < faults.copy_rate:
            items[i] = copy.deepcopy(rng.choice(prompt.references))
            faults.count("copy")
            continue
        if faults.wrong_structure_rate and rng.random() < faults.wrong_structure_rate:
            items[i] = item = break_structure(rng, item, item_schema, writer)
            faults.count("wrong_structure")
        if faults.label_out_of_space_rate and rng.random() < faults.label_out_of_space_rate:
            broken = label_out_of_space(rng, item, slots)
            if broken is not None:
                items[i] = broken
                faults.count("label_out_of_space")
    return orjson.dumps({"examples": items}).decode()


def _schema_of(response_format: Any) -> tuple[dict[str, Any] | None, Any, int | None, int | None]:
    """(root schema, item schema, minItems, maxItems) of a json_schema response format."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None, None, None, None
    spec = response_format.get("json_schema")
    root = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(root, dict):
        return None, None, None, None
    array = (root.get("properties") or {}).get("examples")
    if not isinstance(array, dict):
        return root, None, None, None
    low, high = array.get("minItems"), array.get("maxItems")
    low = min(low, MAX_COUNT) if isinstance(low, int) else None
    high = min(high, MAX_COUNT) if isinstance(high, int) else None
    return root, array.get("items", {}), low, high


def _positions(root: Any) -> list[Any] | None:
    """The per-position item schemas (`prefixItems`) of the examples array, when it has them."""
    array = ((root or {}).get("properties") or {}).get("examples") if isinstance(root, dict) else None
    found = array.get("prefixItems") if isinstance(array, dict) else None
    return found if isinstance(found, list) and found else None


def malform(rng: random.Random, answer: str, truncated_share: float) -> tuple[str, str]:
    """A broken rendering of `answer`: cut short, or fenced with prose around it. Returns (text, kind)."""
    if rng.random() < truncated_share or len(answer) < 4:
        cut = rng.randint(max(1, len(answer) // 5), max(1, len(answer) * 9 // 10))
        return answer[:cut], "malformed_truncated"
    intro = rng.choice(("Here are the new examples:", "Sure. The examples follow.", "Result:"))
    outro = text.sentence(rng)
    return f"{intro}\n```json\n{answer}\n```\n{outro}", "malformed_fenced"

"""The shape of one example: JSON Schema from the formatting example, and label inference.

The schema is a subset of JSON Schema 2020-12 that OpenAI structured output accepts in `strict`
mode: every object lists all its keys as `required` and forbids other keys.
"""

from __future__ import annotations

import copy
import re
from typing import Any

LABEL_NAMES = frozenset({"answer", "label", "gold", "target", "correct"})
OPTION_NAMES = frozenset({"options", "choices", "candidates", "alternatives"})
_SHORT_KEY = re.compile(r"^[A-Za-z0-9]{1,2}$")
_MISSING = object()


def get_path(data: Any, dotted: str, default: Any = None) -> Any:
    """`data["a"]["b"]` for "a.b"; a numeric part indexes a list. `default` when absent."""
    value = data
    for part in dotted.split("."):
        if isinstance(value, dict):
            if part not in value:
                return default
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return default
    return value


def is_label_name(key: str) -> bool:
    name = key.lower()
    return name in LABEL_NAMES or name.endswith("_answer") or name.endswith("_label")


def is_options_map(key: str, value: Any) -> bool:
    """A dict of choices keyed by short keys ("A".."E", "1".."5")."""
    if not isinstance(value, dict) or len(value) < 2:
        return False
    if not all(_SHORT_KEY.match(k) for k in value):
        return False
    return key.lower() in OPTION_NAMES or all(isinstance(v, str) for v in value.values())


def _objects(example: dict, prefix: str = "") -> list[tuple[str, dict]]:
    """Every dict in the example (breadth first) with its dotted prefix ("" for the root)."""
    found = [(prefix, example)]
    queue = [(prefix, example)]
    while queue:
        base, obj = queue.pop(0)
        for key, value in obj.items():
            if isinstance(value, dict) and not is_options_map(key, value):
                path = f"{base}{key}."
                found.append((path, value))
                queue.append((path, value))
    return found


def _infer_in(obj: dict, label_key: str) -> list | None:
    """The label space of `obj[label_key]` from its siblings, or None when it is not plain."""
    value = obj[label_key]
    if isinstance(value, bool):
        return [True, False]
    for key, options in obj.items():
        if key == label_key:
            continue
        if is_options_map(key, options) and isinstance(value, str) and value in options:
            return sorted(options)
    for key, options in obj.items():
        if key == label_key or key.lower() not in OPTION_NAMES or not isinstance(options, list) or not options:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(options):
            if not any(isinstance(o, int) and not isinstance(o, bool) for o in options):
                return list(range(len(options)))
    return None


def options_list_key(obj: dict, label_key: str) -> str | None:
    """The sibling options list that the label is an item of (each example has its own options)."""
    value = obj.get(label_key, _MISSING)
    for key, options in obj.items():
        if key == label_key or key.lower() not in OPTION_NAMES or not isinstance(options, list):
            continue
        if value is not _MISSING and value in options and not isinstance(value, bool):
            return key
    return None


def infer_label(example: dict, field: str | None = None) -> tuple[str | None, list | None]:
    """Label field (dotted path) and label space, where one example makes them plain.

    An options map plus an answer that is one of its keys gives the sorted keys; a boolean label
    gives [True, False]; an options list plus an index gives the indices; an options list plus an
    answer that is one of its items gives the field with no fixed space (each example has its own
    options). Anything else, e.g. 0/1/2 NLI labels, cannot be told from one example: (None, None).
    `field`, when given, restricts the search to that field.
    """
    if not isinstance(example, dict):
        return None, None
    for prefix, obj in _objects(example):
        keys = [k for k in obj if is_label_name(k)]
        if field is not None:
            parent, _, last = field.rpartition(".")
            if prefix != (parent + "." if parent else ""):
                continue
            keys = [last] if last in obj else []
        for key in keys:
            space = _infer_in(obj, key)
            if space is not None:
                return prefix + key, space
            if options_list_key(obj, key) is not None:
                return prefix + key, None
    return (field, None) if field is not None else (None, None)


def _value_schema(value: Any, allow_extra_keys: bool) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": "string", "minLength": 1}
    if value is None:
        return {"type": ["string", "number", "boolean", "null"]}
    if isinstance(value, list):
        return {"type": "array", "items": _value_schema(value[0], allow_extra_keys) if value else {}}
    if isinstance(value, dict):
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {key: _value_schema(item, allow_extra_keys) for key, item in value.items()},
            "required": list(value),
        }
        if not allow_extra_keys:
            schema["additionalProperties"] = False
        return schema
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def json_type(value: Any) -> str:
    """The JSON Schema type name of a JSON value ("integer" for ints, "number" for floats)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _set_enum(schema: dict[str, Any], path: list[str], space: list) -> None:
    node = schema
    for part in path:
        if node.get("type") == "array" and part.isdigit():
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(part)
        if node is None:
            raise ValueError(f"label field {'.'.join(path)!r} is not in the formatting example")
    node["enum"] = list(space)
    types = {json_type(v) for v in space}
    declared = node.get("type")
    fits = declared == next(iter(types)) if len(types) == 1 else False
    if declared == "number" and types <= {"integer", "number"}:
        fits = True
    if not fits:
        node.pop("type", None)
        node.pop("minLength", None)


def example_schema(
    formatting_example: dict,
    label_field: str | None = None,
    label_space: list | None = None,
    allow_extra_keys: bool = False,
) -> dict[str, Any]:
    """JSON Schema of one example shaped like `formatting_example`; the label gets `enum`."""
    if not isinstance(formatting_example, dict):
        raise TypeError("the formatting example must be a JSON object")
    schema = _value_schema(formatting_example, allow_extra_keys)
    if label_field and label_space:
        _set_enum(schema, label_field.split("."), label_space)
    return schema


def label_path_in_objects(schema: dict[str, Any], label_field: str) -> bool:
    """Whether the label sits under object keys only (a label inside a list cannot be pinned per item)."""
    node: Any = schema
    for part in label_field.split("."):
        if not isinstance(node, dict) or node.get("type") != "object":
            return False
        node = (node.get("properties") or {}).get(part)
    return isinstance(node, dict) and node.get("type") != "array"


def pinned_item_schema(item_schema: dict[str, Any], label_field: str, label: Any) -> dict[str, Any]:
    """`item_schema` with the label fixed to `label` and its key first at every level of its path.

    First, because a model writes keys in schema order: a label forced after the text only
    relabels text written for another label.

    Only the objects on the label's path are new; the subschemas off it are `item_schema`'s own,
    shared, not copied (one call's answer format pins every item of it: a deep copy per item was
    most of the cost of building a request). Read the result, do not change it.
    """
    schema = dict(item_schema)
    node = schema
    parts = label_field.split(".")
    for depth, part in enumerate(parts):
        properties = node["properties"]
        node["properties"] = {part: properties[part], **{k: v for k, v in properties.items() if k != part}}
        if "required" in node:
            node["required"] = [part, *(k for k in node["required"] if k != part)]
        if depth == len(parts) - 1:
            node["properties"][part] = {"type": json_type(label), "const": copy.deepcopy(label)}
        else:
            child = node["properties"][part] = dict(node["properties"][part])
            node = child
    return schema


def batch_schema(
    item_schema: dict[str, Any], n: int, label_field: str | None = None, labels: list[Any] | None = None
) -> dict[str, Any]:
    """The answer to one call: an object holding exactly `n` examples.

    With `labels` (one per item), each position has its own schema pinning its label
    (`prefixItems`, no `items`: llama.cpp's grammar converter reads `items` first when both are there).
    The item schemas are `item_schema`'s own objects, shared (see `pinned_item_schema`): read the
    result, do not change it.
    """
    if labels is not None and label_field:
        array: dict[str, Any] = {
            "type": "array",
            "prefixItems": [pinned_item_schema(item_schema, label_field, label) for label in labels],
            "minItems": len(labels),
            "maxItems": len(labels),
        }
    else:
        array = {"type": "array", "items": item_schema, "minItems": n, "maxItems": n}
    return {
        "type": "object",
        "properties": {"examples": array},
        "required": ["examples"],
        "additionalProperties": False,
    }


def ordered_like(value: Any, schema: Any) -> Any:
    """`value` with its object keys in the schema's order (the formatting example's), extra keys last."""
    if isinstance(value, dict) and isinstance(schema, dict):
        properties = schema.get("properties") or {}
        if not properties:
            return value
        known = [k for k in properties if k in value]
        if list(value)[: len(known)] == known and all(not isinstance(value[k], (dict, list)) for k in known):
            return value
        out = {k: ordered_like(value[k], properties[k]) for k in known}
        out.update((k, v) for k, v in value.items() if k not in properties)
        return out
    if isinstance(value, list) and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
        return [ordered_like(v, schema["items"]) for v in value]
    return value

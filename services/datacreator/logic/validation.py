"""Check one parsed item against the formatting example's shape and the label space.

The shape is compiled once per request into nested checker functions: a hand-written check is
several times faster than a JSON Schema validator, and the curator checks every item it sees.
"""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from datacreator.contracts import RejectReason
from datacreator.logic.shape import OPTION_NAMES, example_schema, get_path, infer_label

_MISSING = object()
# Characters that render as nothing but are not Unicode format characters (category Cf):
# blank braille, Hangul fillers, the Mongolian vowel separator (Cf before Unicode 6.3).
_BLANKS = (0x2800, 0x115F, 0x1160, 0x3164, 0xFFA0, 0x180E)


@lru_cache(maxsize=1)
def _invisible_table() -> dict[int, None]:
    table = {cp: None for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) == "Cf"}
    table.update((cp, None) for cp in _BLANKS)
    return table


MAX_FIELD_DEPTH = 32
MAX_FIELD_BYTES = 256 * 1024


def bounded_field_problem(name: str, value: Any, max_depth: int = MAX_FIELD_DEPTH, max_bytes: int = MAX_FIELD_BYTES) -> str | None:
    """Why a free-form JSON field is too deep or too large to travel on the bus, or None.

    orjson refuses to encode past 254 levels: a field that deep would fail at every snapshot.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                return f"{name} is nested deeper than {max_depth} levels"
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    try:
        size = len(orjson.dumps(value))
    except TypeError as exc:
        return f"{name} cannot be encoded as JSON: {exc}"
    if size > max_bytes:
        return f"{name} is {size} bytes; the limit is {max_bytes}"
    return None


def request_fields_problem(request: Any) -> str | None:
    """The first free-form field of a request that is too deep or too large, as a REJECTED reason."""
    for name in ("formatting_example", "metadata", "label_space"):
        problem = bounded_field_problem(name, getattr(request, name))
        if problem is not None:
            return problem
    return None


def strip_invisible(text: str) -> str:
    """`text` without format characters (zero-width spaces and joiners, bidi marks, ...) and blanks."""
    return text if text.isascii() else text.translate(_invisible_table())

# A failure bubbles up as [reason, message, innermost path part, ..., outermost path part].
Failure = list[Any]
Checker = Callable[[Any], Failure | None]

_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True, slots=True)
class Verdict:
    reason: RejectReason
    detail: str


def _label_key(value: Any) -> tuple[str, Any]:
    """Hashable, type-aware identity: True is not 1, but 1 is 1.0."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if value is None:
        return ("z", None)
    return ("j", orjson.dumps(value, option=orjson.OPT_SORT_KEYS))


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _format_path(parts: list[Any]) -> str:
    out = ""
    for part in reversed(parts):
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


class _Compiler:
    def __init__(self, max_field_chars: int, allow_extra_keys: bool | None, strings: bool) -> None:
        self.max_chars = max_field_chars
        self.allow_extra = allow_extra_keys
        self.strings = strings

    def compile(self, schema: Any) -> Checker | None:
        """A checker for `schema`, or None when it accepts anything."""
        if not isinstance(schema, dict):
            return None
        kind = schema.get("type")
        if isinstance(kind, list):
            return self._union(set(kind))
        if kind == "object":
            return self._object(schema)
        if kind == "array":
            return self._array(schema)
        if kind == "string":
            return self._string()
        if kind == "integer":
            return _exact_type(int, "integer")
        if kind == "number":
            return _number
        if kind == "boolean":
            return _exact_type(bool, "boolean")
        if kind == "null":
            return _exact_type(type(None), "null")
        return None

    def _string(self) -> Checker:
        if not self.strings:
            return _exact_type(str, "string")
        limit = self.max_chars

        def check(value: Any) -> Failure | None:
            if type(value) is not str:
                return [RejectReason.structure_mismatch, f"expected string, got {_type_name(value)}"]
            if not value or value.isspace() or not strip_invisible(value).strip():
                return [RejectReason.empty_field, "empty string"]
            if len(value) > limit:
                return [RejectReason.field_too_long, f"{len(value)} characters (limit {limit})"]
            return None

        return check

    def _union(self, kinds: set[str]) -> Checker:
        allowed: set[type] = set()
        for kind, types in (("string", (str,)), ("integer", (int,)), ("number", (int, float)), ("boolean", (bool,)),
                            ("null", (type(None),)), ("array", (list,)), ("object", (dict,))):
            if kind in kinds:
                allowed.update(types)
        limit = self.max_chars
        strings = self.strings

        def check(value: Any) -> Failure | None:
            if type(value) not in allowed:
                return [RejectReason.structure_mismatch, f"expected {'|'.join(sorted(kinds))}, got {_type_name(value)}"]
            if strings and type(value) is str and len(value) > limit:
                return [RejectReason.field_too_long, f"{len(value)} characters (limit {limit})"]
            return None

        return check

    def _array(self, schema: dict) -> Checker:
        item = self.compile(schema.get("items"))

        def check(value: Any) -> Failure | None:
            if type(value) is not list:
                return [RejectReason.structure_mismatch, f"expected array, got {_type_name(value)}"]
            if item is not None:
                for index, element in enumerate(value):
                    failure = item(element)
                    if failure is not None:
                        failure.append(index)
                        return failure
            return None

        return check

    def _object(self, schema: dict) -> Checker:
        properties: dict[str, Any] = schema.get("properties") or {}
        compiled = [(key, self.compile(sub)) for key, sub in properties.items()]
        checkers = [(key, c) for key, c in compiled if c is not None]
        keys = frozenset(properties)
        required = frozenset(schema.get("required", properties))
        extras_ok = schema.get("additionalProperties", True) is not False if self.allow_extra is None else self.allow_extra

        def check(value: Any) -> Failure | None:
            if type(value) is not dict:
                return [RejectReason.structure_mismatch, f"expected object, got {_type_name(value)}"]
            if value.keys() != keys:
                missing = sorted(required - value.keys())
                extra = sorted(value.keys() - keys)
                if missing or (extra and not extras_ok):
                    words = []
                    if missing:
                        words.append(f"missing keys {missing}")
                    if extra and not extras_ok:
                        words.append(f"unexpected keys {extra}")
                    return [RejectReason.structure_mismatch, ", ".join(words)]
            for key, checker in checkers:
                if key in value:
                    failure = checker(value[key])
                    if failure is not None:
                        failure.append(key)
                        return failure
            return None

        return check


def _exact_type(kind: type, name: str) -> Checker:
    def check(value: Any) -> Failure | None:
        if type(value) is not kind:
            return [RejectReason.structure_mismatch, f"expected {name}, got {_type_name(value)}"]
        return None

    return check


def _number(value: Any) -> Failure | None:
    if type(value) is not float and type(value) is not int:
        return [RejectReason.structure_mismatch, f"expected number, got {_type_name(value)}"]
    return None


def _schema_at(schema: dict, path: list[str]) -> dict | None:
    node: Any = schema
    for part in path:
        if not isinstance(node, dict):
            return None
        if node.get("type") == "array" and part.isdigit():
            node = node.get("items")
        else:
            node = (node.get("properties") or {}).get(part)
    return node if isinstance(node, dict) else None


class ExampleValidator:
    """Built once per request; `validate` says why an item is not a valid example, or None."""

    def __init__(
        self,
        formatting_example: dict,
        label_field: str | None = None,
        label_space: list | None = None,
        allow_extra_keys: bool = False,
        max_field_chars: int = 5000,
    ) -> None:
        if label_field is None or label_space is None:
            inferred_field, inferred_space = infer_label(formatting_example, field=label_field)
            if label_field is None and label_space is not None:
                label_space = label_space if inferred_field else None
            label_field = label_field or inferred_field
            label_space = label_space if label_space is not None else inferred_space
        schema = example_schema(formatting_example, label_field, label_space, allow_extra_keys)
        self._setup(schema, label_field, label_space, allow_extra_keys, max_field_chars)

    @classmethod
    def from_schema(
        cls,
        schema: dict,
        label_field: str | None = None,
        label_space: list | None = None,
        allow_extra_keys: bool | None = None,
        max_field_chars: int = 5000,
    ) -> ExampleValidator:
        """From an example's JSON Schema (as a task carries it); the label's `enum` is its space."""
        self = cls.__new__(cls)
        if label_field and label_space is None:
            node = _schema_at(schema, label_field.split("."))
            if node is not None and isinstance(node.get("enum"), list):
                label_space = node["enum"]
            elif node is not None and node.get("type") == "boolean":
                label_space = [True, False]
        self._setup(schema, label_field, label_space, allow_extra_keys, max_field_chars)
        return self

    def _setup(self, schema: dict, label_field: str | None, label_space: list | None,
               allow_extra_keys: bool | None, max_field_chars: int) -> None:
        self.schema = schema
        self.label_field = label_field
        self.label_space = list(label_space) if label_space is not None else None
        self.max_field_chars = max_field_chars
        self._check = _Compiler(max_field_chars, allow_extra_keys, strings=True).compile(schema)
        self._structure = _Compiler(max_field_chars, allow_extra_keys, strings=False).compile(schema)
        self._space = frozenset(_label_key(v) for v in self.label_space) if self.label_space is not None else None
        self._label_parts = label_field.split(".") if label_field else []
        self._options_key: str | None = None
        self._options_kind: str | None = None  # "keys" | "items" | "index"
        if label_field:
            parent = _schema_at(schema, self._label_parts[:-1]) if len(self._label_parts) > 1 else schema
            label_node = _schema_at(schema, self._label_parts) or {}
            siblings = (parent or {}).get("properties") or {}
            for key, node in siblings.items():
                if key == self._label_parts[-1] or key.lower() not in OPTION_NAMES or not isinstance(node, dict):
                    continue
                if node.get("type") == "object":
                    self._options_key, self._options_kind = key, "keys"
                elif node.get("type") == "array":
                    items_type = (node.get("items") or {}).get("type")
                    as_index = label_node.get("type") == "integer" and items_type != "integer"
                    self._options_key, self._options_kind = key, "index" if as_index else "items"
                break

    @property
    def top_level_keys(self) -> list[str]:
        return list((self.schema.get("properties") or {}).keys())

    def validate(self, item: Any) -> Verdict | None:
        if type(item) is not dict:
            return Verdict(RejectReason.structure_mismatch, f"expected object, got {_type_name(item)}")
        if self._check is not None:
            failure = self._check(item)
            if failure is not None:
                if failure[0] is not RejectReason.structure_mismatch and self._structure is not None:
                    failure = self._structure(item) or failure
                return Verdict(failure[0], f"{_format_path(failure[2:])}: {failure[1]}")
        if self.label_field:
            return self._check_label(item)
        return None

    def _check_label(self, item: dict) -> Verdict | None:
        # The same resolver as request validation: numeric parts step through lists ("turns.0.speaker").
        parts = self._label_parts
        parent: Any = get_path(item, ".".join(parts[:-1]), _MISSING) if len(parts) > 1 else item
        value = _MISSING if parent is _MISSING else get_path(parent, parts[-1], _MISSING)
        if value is _MISSING:
            return Verdict(RejectReason.label_out_of_space, f"{self.label_field}: missing")
        try:
            known = self._space is None or _label_key(value) in self._space
        except TypeError:
            known = False
        if not known:
            return Verdict(RejectReason.label_out_of_space, f"{self.label_field}: {value!r} not in {self.label_space!r}")
        if self._options_key is not None:
            options = parent.get(self._options_key) if isinstance(parent, dict) else None
            kind = self._options_kind
            if kind == "keys":
                ok = isinstance(options, dict) and isinstance(value, str) and value in options
            elif kind == "index":
                ok = isinstance(options, list) and type(value) is int and 0 <= value < len(options)
            else:
                ok = isinstance(options, list) and any(_label_key(value) == _label_key(o) for o in options if isinstance(o, _SCALARS))
            if not ok:
                return Verdict(RejectReason.label_out_of_space, f"{self.label_field}: {value!r} is not one of this example's {self._options_key}")
        return None



# A created example can be longer than the formatting example it imitates: its size is reckoned
# at this many times the seed's, plus what an accepted reference carries besides the data.
EXAMPLE_GROWTH = 2
REFERENCE_OVERHEAD_BYTES = 120
SNAPSHOT_HEADROOM = 0.9


def snapshot_size_problem(
    request: Any, example_schema: Any, *, max_bytes: int, pool_size: int, tree_level_nodes: int
) -> str | None:
    """Why the planner's snapshot of `request` could outgrow a record the broker accepts, or None.

    The snapshot is one record on a compacted topic (Kafka's default limit is ~1 MB). What grows
    with the request: each chain keeps its reference, its last good one and the choices of its
    latest call (its accepted examples, up to examples_per_call), and a call in flight carries its reference; the tree keeps a
    level of nodes and the next one; reference_pool=all_accepted keeps a pool. Everything else
    (the request itself, its schema) is there once.
    """
    seed = len(orjson.dumps(request.formatting_example))
    example = EXAMPLE_GROWTH * seed + REFERENCE_OVERHEAD_BYTES
    fixed = len(orjson.dumps(request.model_dump(mode="json"))) + len(orjson.dumps(example_schema))
    if request.strategy == "tree":
        kept = 2 * tree_level_nodes + request.chains
    else:
        kept = request.chains * (request.examples_per_call + 3)
    if request.reference_pool == "all_accepted":
        kept += pool_size
    estimate = fixed + kept * example
    limit = int(max_bytes * SNAPSHOT_HEADROOM)
    if estimate <= limit:
        return None
    what = (f"{2 * tree_level_nodes} tree nodes + {request.chains} calls in flight" if request.strategy == "tree"
            else f"chains {request.chains} x (examples_per_call {request.examples_per_call} + 3)")
    if request.reference_pool == "all_accepted":
        what += f" + a pool of {pool_size}"
    return (
        f"the planner's snapshot of this request could reach {estimate} bytes ({what} examples of about "
        f"{example} bytes each), over {limit} bytes ({SNAPSHOT_HEADROOM:.0%} of max_message_bytes {max_bytes}, "
        "the broker's record limit): lower chains or examples_per_call, or use a smaller formatting example"
    )

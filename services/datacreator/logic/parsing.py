"""Parse a model's answer into candidate examples, keeping every good item of a messy answer.

Handles a bare JSON list, an object holding the list, one object, JSON in ``` fences, prose
around the JSON, several fenced blocks, trailing commas, one broken item among good ones, and
output cut off mid-item. Well-formed answers cost one orjson call; the fallbacks run only when
that fails.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import orjson

# Keys under which a model tends to put the list of examples.
WRAPPER_KEYS = frozenset({"examples", "items", "data", "results", "outputs", "samples", "dataset", "output"})
FRAGMENT_LIMIT = 2000

_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\r?\n?(.*?)(?:```|\Z)", re.S)
_OPENER = re.compile(r"[\[{]")
# A JSON string (or one cut off at the end of the text), or a bracket.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\Z)|[\[\]{}]', re.S)
_TRAILING_COMMA = re.compile(r'("(?:[^"\\]|\\.)*")|,(\s*[}\]])', re.S)
_COLON_GAP = re.compile(r"\s*:\s*")
_NEXT_CHAR = re.compile(r"\s*(\S)")
# A JSON string followed by a colon: an object key.
_KEY = re.compile(r'"(?:[^"\\]|\\.)*"\s*(:)?', re.S)
MAX_DEPTH = 32
MAX_ITEM_BYTES = 64 * 1024


@dataclass(slots=True)
class ParseError:
    reason: str
    fragment: str
    code: str = "unparseable"  # a RejectReason value
    item: Any = None  # the item, when it parsed but cannot be used as it is


class _DuplicateKeys(dict):
    """An object of the answer that named one of its keys more than once."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    return value if len(value) == len(pairs) else _DuplicateKeys(value)


def _shape(value: Any) -> tuple[int, int]:
    """Object keys and nesting depth of a parsed value (iterative: any depth is safe)."""
    keys, deepest = 0, 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            keys += len(item)
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item)
    return keys, deepest


@dataclass(slots=True)
class ParseResult:
    items: list[Any] = field(default_factory=list)
    errors: list[ParseError] = field(default_factory=list)


def _checked(text: str, value: Any) -> Any:
    """`value` parsed from `text`, its objects with a repeated key marked (orjson keeps the last silently)."""
    if (isinstance(value, dict | list)) and _KEY.findall(text).count(":") != _shape(value)[0]:
        return json.loads(text, object_pairs_hook=_pairs)
    return value


def _loads(text: str) -> Any:
    """orjson, then orjson after dropping trailing commas; raises ValueError."""
    try:
        return _checked(text, orjson.loads(text))
    except orjson.JSONDecodeError:
        fixed = _TRAILING_COMMA.sub(r"\1\2", text)  # an unmatched group is empty: no Python call per match
        if fixed == text:
            raise
        return _checked(fixed, orjson.loads(fixed))


def _unwrap(value: Any, example_keys: Collection[str] | None) -> list[Any]:
    """The items a parsed answer holds."""
    if isinstance(value, list):
        if value and all(isinstance(inner, list) for inner in value):
            return [item for inner in value for item in inner]  # [[...]]: one level of nesting too many
        return value
    if isinstance(value, dict):
        if example_keys and value and set(value) <= set(example_keys):
            return [value]
        lists = [inner for key, inner in value.items() if key.lower() in WRAPPER_KEYS and isinstance(inner, list)]
        if lists:
            # {"items": [], "examples": [...]}: the list whose objects look like the example wins.
            def fit(inner: list[Any]) -> tuple[bool, bool]:
                shaped = any(isinstance(i, dict) and (not example_keys or set(i) & set(example_keys)) for i in inner)
                return shaped, bool(inner)

            return max(lists, key=fit)
        if len(value) == 1:
            inner = next(iter(value.values()))
            if isinstance(inner, list) and (not inner or isinstance(inner[0], dict)):
                return inner
        return [value]
    return [value]


def _clip(text: str) -> str:
    return text if len(text) <= FRAGMENT_LIMIT else text[:FRAGMENT_LIMIT]


def _segments(text: str) -> list[tuple[int, int, bool]]:
    """Top-level bracketed spans as (start, end, closed); quotes count only inside brackets."""
    spans: list[tuple[int, int, bool]] = []
    pos = 0
    while True:
        opener = _OPENER.search(text, pos)
        if opener is None:
            return spans
        start = opener.start()
        depth = 0
        end = None
        for token in _TOKEN.finditer(text, start):
            char = token.group()
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
                if depth == 0:
                    end = token.end()
                    break
        if end is None:
            spans.append((start, len(text), False))
            return spans
        spans.append((start, end, True))
        pos = end


def _salvage(seg: str, example_keys: Collection[str] | None, result: ParseResult) -> None:
    """Parse the complete objects of the item list in a segment that does not parse as a whole."""
    container_depth = 1 if seg[0] == "[" else None
    depth = 0
    child_start = -1
    last_end = 1 if container_depth else 0
    found_container = container_depth is not None
    junk: list[str] = []
    last_string: re.Match[str] | None = None
    for token in _TOKEN.finditer(seg):
        char = token.group()
        if char[0] == '"':
            last_string = token
            continue
        if char in "[{":
            depth += 1
            if container_depth is None and char == "[" and depth == 2:
                # The key before the list: the last string, when only a colon lies between them.
                # Looking back from the token (not searching from 0) keeps salvage linear.
                key = None
                if last_string is not None and _COLON_GAP.fullmatch(seg, last_string.end(), token.start()):
                    key = last_string.group()[1:-1]
                following = _NEXT_CHAR.match(seg, token.end())
                wrapper = key is not None and key.lower() in WRAPPER_KEYS
                mine = key is not None and example_keys is not None and key in example_keys
                if (wrapper or (following is not None and following.group(1) == "{")) and not mine:
                    container_depth, found_container, last_end = 2, True, token.end()
            elif container_depth is not None and depth == container_depth + 1 and char == "{":
                child_start = token.start()
                junk.append(seg[last_end:child_start])
        elif char in "]}":
            depth -= 1
            if container_depth is not None and depth == container_depth and char == "}" and child_start >= 0:
                fragment = seg[child_start:token.end()]
                try:
                    result.items.append(_loads(fragment))
                except ValueError:
                    result.errors.append(ParseError("item is not valid JSON", _clip(fragment)))
                child_start, last_end = -1, token.end()
            elif container_depth is not None and depth < container_depth:
                junk.append(seg[last_end:token.start()])
                container_depth, last_end = None, token.end()
                break
    if not found_container:
        result.errors.append(ParseError("not valid JSON", _clip(seg)))
        return
    if child_start >= 0:
        result.errors.append(ParseError("truncated item", _clip(seg[child_start:])))
    elif container_depth is not None:
        junk.append(seg[last_end:])
    for text in junk:
        text = text.strip().strip(",").strip()
        if text and text not in ("]", "}"):
            result.errors.append(ParseError("item is not a JSON object", _clip(text)))


def _parse_block(text: str, example_keys: Collection[str] | None, result: ParseResult) -> None:
    """One block of text (a fence's body, or the whole answer) holding JSON among prose."""
    first = _OPENER.search(text)
    if first is None:
        if text.strip():
            result.errors.append(ParseError("no JSON found", _clip(text.strip())))
        return
    last = max(text.rfind("]"), text.rfind("}"))
    if last > first.start():
        try:
            result.items.extend(_unwrap(_loads(text[first.start():last + 1]), example_keys))
            return
        except ValueError:
            pass
    parts: list[ParseResult] = []
    for start, end, closed in _segments(text):
        part = ParseResult()
        segment = text[start:end]
        if closed:
            try:
                part.items.extend(_unwrap(_loads(segment), example_keys))
            except ValueError:
                _salvage(segment, example_keys, part)
        else:
            _salvage(segment, example_keys, part)
        parts.append(part)
    # Bracketed prose ("[5]") next to real output: keep only the parts that hold objects.
    if any(any(isinstance(i, dict) for i in p.items) for p in parts):
        parts = [p for p in parts if not p.items or any(isinstance(i, dict) for i in p.items)]
    for part in parts:
        result.items.extend(part.items)
        result.errors.extend(part.errors)


def _screen(result: ParseResult, max_depth: int, max_item_bytes: int) -> ParseResult:
    """Move items with a repeated key, or nested or sized past the bounds, to the errors."""
    kept: list[Any] = []
    for item in result.items:
        _, depth = _shape(item)
        if depth > max_depth:
            result.errors.append(ParseError(f"item is nested deeper than {max_depth} levels", "", "structure_mismatch"))
            continue
        try:
            size = len(orjson.dumps(item))
        except TypeError as exc:
            result.errors.append(ParseError(f"item cannot be encoded: {exc}", "", "structure_mismatch"))
            continue
        if size > max_item_bytes:
            result.errors.append(ParseError(f"item is {size} bytes; the limit is {max_item_bytes}", "", "structure_mismatch"))
            continue
        if _has_duplicate_keys(item):
            result.errors.append(ParseError("an object of the item names a key twice", "", "duplicate_key", _plain(item)))
            continue
        kept.append(item)
    result.items = kept
    return result


def _has_duplicate_keys(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _DuplicateKeys):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _plain(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))


def parse_examples(raw: str | None, example_keys: Collection[str] | None = None, *,
                   max_depth: int = MAX_DEPTH, max_item_bytes: int = MAX_ITEM_BYTES) -> ParseResult:
    """Items and errors found in a model's answer; see `_screen` for the items kept out."""
    return _screen(_parse(raw, example_keys), max_depth, max_item_bytes)


def _parse(raw: str | None, example_keys: Collection[str] | None = None) -> ParseResult:
    """Items and errors found in a model's answer.

    `example_keys` (the formatting example's top-level keys) tells a lone example object from an
    object that wraps the list.
    """
    result = ParseResult()
    if raw is None or not raw.strip():
        result.errors.append(ParseError("empty output", ""))
        return result
    try:
        result.items.extend(_unwrap(_checked(raw, orjson.loads(raw)), example_keys))
        return result
    except orjson.JSONDecodeError:
        pass
    if "```" in raw:
        blocks = [m.group(1) for m in _FENCE.finditer(raw) if m.group(1).strip()]
        for block in blocks:
            _parse_block(block, example_keys, result)
        if result.items or blocks:
            return result
    _parse_block(raw, example_keys, result)
    return result

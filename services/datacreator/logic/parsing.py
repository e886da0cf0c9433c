"""Parse a model's answer into items (examples not yet checked), keeping every good item of a messy answer.

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
MAX_DEPTH = 32
MAX_ITEM_BYTES = 64 * 1024
# Salvage sees brackets nested this deep as never closed: items past MAX_DEPTH are rejected anyway,
# and a bound keeps the span pattern (one nested group per level) small.
SPAN_DEPTH = 128
# Bracketed values that salvage looks at in one answer (segments, lists beside the container, its
# items). A 32k-token answer holds a few thousand; the bound keeps garbage made of brackets linear
# in C rather than in Python.
MAX_FRAGMENTS = 20_000

_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\r?\n?(.*?)(?:```|\Z)", re.S)
_OPENER = re.compile(r"[\[{]")
_COLON_GAP = re.compile(r"\s*:\s*")
_NEXT_CHAR = re.compile(r"\s*(\S)")
# A JSON string followed by a colon: an object key.
_KEY = re.compile(r'"(?:[^"\\]|\\.)*"\s*(:)?', re.S)
_SPACED_COLON = re.compile(r'"\s+:')
_QUOTE_GAPS = ('" ', '"\n', '"\r', '"\t')
# Everything below is possessive (`*+`, `++`): the regex engine never backtracks, so every match
# is linear in what it reads, in C. Python then only steps from one bracketed value to the next.
_STRING = r'"(?:[^"\\]++|\\.)*+"'
_PLAIN = r'[^"\[\]{}]++'


def _nested(depth: int, string: str = _STRING, plain: str = _PLAIN) -> str:
    """The inside of a bracketed span nested at most `depth` levels (any closer closes any opener)."""
    inner = f"(?:{plain}|{string})*+"
    for _ in range(depth - 1):
        inner = f"(?:{plain}|{string}|[\\[{{]{inner}[\\]}}])*+"
    return inner


_INNER = _nested(SPAN_DEPTH - 1)
# A closed bracketed span: [...] or {...}, strings skipped.
_SPAN = re.compile(f"[\\[{{]{_INNER}[\\]}}]", re.S)
_SPAN_OR_OPENER = re.compile(f"{_SPAN.pattern}|[\\[{{]", re.S)
# Members of the answer's top object up to the next list, closer, cut-off string or end; a key
# whose value is a list stops it too, so the key is read from there. (No capture group inside a
# possessive repeat: CPython 3.11's re gets its span wrong.)
_TOP_SKIP = re.compile(f"(?:{_PLAIN}|{_STRING}(?!\\s*+:\\s*+\\[)|\\{{{_INNER}[\\]}}])*+", re.S)
_STRING_AT = re.compile(_STRING, re.S)
# Text between the items of the container (scalars, lists, commas), up to the next object.
_JUNK_SKIP = re.compile(f"(?:{_PLAIN}|{_STRING}|\\[{_INNER}[\\]}}])*+", re.S)
# Objects separated by commas only: the usual body of the item list, parsed in one call.
_OBJECT = f"\\{{{_INNER}[\\]}}]"
_OBJECT_RUN = re.compile(f"{_OBJECT}(?:\\s*+,\\s*+{_OBJECT})*+", re.S)
# Drops trailing commas outside strings: the pieces between them are joined ("" for a comma).
_NOT_TRAILING_COMMA = re.compile(r'(?:[^",]++|"(?:[^"\\]++|\\.)*+"|,(?!\s*+[}\]]))++|"|,', re.S)


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


class _Budget:
    """Bracketed values salvage may still look at in this answer."""

    __slots__ = ("left", "spent")

    def __init__(self, limit: int = MAX_FRAGMENTS) -> None:
        self.left = limit
        self.spent = False

    def take(self) -> bool:
        self.left -= 1
        if self.left >= 0:
            return True
        self.spent = True
        return False


def _colon_keys(text: str | bytes) -> int:
    """`":` in JSON text that has no space before a colon: its keys, less the `\\":` inside strings."""
    quote: Any = '":' if isinstance(text, str) else b'":'
    slash: Any = "\\" if isinstance(text, str) else b"\\"
    count, sign, run = text.count(quote), -1, 1
    # A quote after an odd run of backslashes is inside a string; after an even run it ends a key.
    while (after := text.count(slash * run + quote)) > 0:
        count += sign * after
        sign, run = -sign, run + 1
    return count


def _source_keys(text: str) -> int:
    # The regex runs only when a quote is followed by a space at all (pretty-printed JSON).
    if not any(gap in text for gap in _QUOTE_GAPS) or _SPACED_COLON.search(text) is None:
        return _colon_keys(text)
    return _KEY.findall(text).count(":")


def _checked(text: str, value: Any) -> Any:
    """`value` parsed from `text`, its objects with a repeated key marked (orjson keeps the last silently).

    The keys of the text and of the value are counted with `str.count` (orjson's output has no
    spaces); only a difference costs the slow parse that tells which object repeats a key.
    """
    if not isinstance(value, dict | list):
        return value
    try:
        parsed = _colon_keys(orjson.dumps(value))
    except TypeError:  # unencodable (an integer past 64 bits): the screen rejects it anyway
        parsed = _shape(value)[0]
    if _source_keys(text) != parsed:
        return json.loads(text, object_pairs_hook=_pairs)
    return value


def _without_trailing_commas(text: str) -> str:
    # A lone "," piece is a trailing comma (any other comma is inside a longer piece).
    return "".join(piece for piece in _NOT_TRAILING_COMMA.findall(text) if piece != ",")


def _loads(text: str) -> Any:
    """orjson, then orjson after dropping trailing commas; raises ValueError."""
    try:
        return _checked(text, orjson.loads(text))
    except orjson.JSONDecodeError as exc:
        # Valid up to an end that leaves a value open (the usual cut-off answer): no comma to drop
        # could close it, so the text is not read again.
        if _ended_open(exc):
            raise
        fixed = _without_trailing_commas(text)
        if len(fixed) == len(text):
            raise
        return _checked(fixed, orjson.loads(fixed))


def _unwrap(value: Any, example_keys: Collection[str] | None) -> list[Any]:
    """The items a parsed answer holds."""
    if isinstance(value, list):
        if value and all(isinstance(inner, list) for inner in value):
            return [item for inner in value for item in inner]  # [[...]]: one level of nesting too many
        return value
    if isinstance(value, dict):
        if example_keys and value and set(value).issubset(example_keys):
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


def _ended_open(exc: ValueError) -> bool:
    """Whether a parse failed only because the text ended inside a value (valid up to there)."""
    return isinstance(exc, orjson.JSONDecodeError) and exc.pos >= len(exc.doc) and "end of data" in exc.msg


def _segments(text: str, budget: _Budget) -> list[tuple[int, int, bool]]:
    """Top-level bracketed spans as (start, end, closed); quotes count only inside brackets."""
    spans: list[tuple[int, int, bool]] = []
    # Each match is a closed span, or a lone opener where the span never closes (the last one).
    for match in _SPAN_OR_OPENER.finditer(text):
        if not budget.take():
            break
        start, end = match.span()
        if end - start == 1:  # a closed span is two characters at least
            spans.append((start, len(text), False))
            break
        spans.append((start, end, True))
    return spans


def _end(pattern: re.Pattern[str], text: str, pos: int) -> int:
    """Where a skip pattern (it matches the empty string too) stops."""
    match = pattern.match(text, pos)
    assert match is not None
    return match.end()


def _container(seg: str, example_keys: Collection[str] | None, budget: _Budget) -> int | None:
    """Where the item list of a top object starts: a list in it under a wrapper key, or holding objects."""
    pos = 1
    while True:
        at = _end(_TOP_SKIP, seg, pos)
        key = None
        if at < len(seg) and seg[at] == '"':
            # A key whose value is a list (the skip stops before those), or a string cut off.
            string = _STRING_AT.match(seg, at)
            if string is None:
                return None
            at = seg.index("[", string.end())
            if _COLON_GAP.fullmatch(seg, string.end(), at):
                key = string.group()[1:-1]
        elif at >= len(seg) or seg[at] != "[":  # the object ends, or is cut off, before another list
            return None
        following = _NEXT_CHAR.match(seg, at + 1)
        wrapper = key is not None and key.lower() in WRAPPER_KEYS
        mine = key is not None and example_keys is not None and key in example_keys
        if (wrapper or (following is not None and following.group(1) == "{")) and not mine:
            return at
        if not budget.take():
            return None
        inner = _SPAN.match(seg, at)
        if inner is None:
            return None
        pos = inner.end()


def _salvage(seg: str, example_keys: Collection[str] | None, result: ParseResult, budget: _Budget) -> None:
    """Parse the complete objects of the item list in a segment that does not parse as a whole."""
    start = 0 if seg[0] == "[" else _container(seg, example_keys, budget)
    if start is None:
        result.errors.append(ParseError("not valid JSON", _clip(seg)))
        return
    pos = last_end = start + 1
    junk: list[str] = []
    ended = _leading_objects(seg, pos, result)
    if ended is not None:
        pos = last_end = ended
    truncated: str | None = None
    while True:
        at = _end(_JUNK_SKIP, seg, pos)
        if at >= len(seg) or seg[at] in '"[':  # the list is cut off (in a string, or in a list)
            junk.append(seg[last_end:])
            break
        junk.append(seg[last_end:at])
        if seg[at] != "{":  # the list closes
            break
        if not budget.take():
            break
        run = _OBJECT_RUN.match(seg, at)
        if run is None:
            truncated = seg[at:]
            break
        _objects(seg, at, run.end(), result, budget)
        pos = last_end = run.end()
    if truncated is not None:
        result.errors.append(ParseError("truncated item", _clip(truncated)))
    for text in junk:
        text = text.strip().strip(",").strip()
        if text and text not in ("]", "}"):
            result.errors.append(ParseError("item is not a JSON object", _clip(text)))


_COMMA = re.compile(r"\s*+,\s*+")
_CLOSER_TRIES = 3


def _leading_objects(seg: str, pos: int, result: ParseResult) -> int | None:
    """The usual cut-off answer, in one orjson call: the list's objects up to one of the last few
    `}`, when that prefix parses. Returns where the objects end; None leaves it to the item loop."""
    end = len(seg)
    for _ in range(_CLOSER_TRIES):
        end = seg.rfind("}", pos, end)
        if end < 0:
            return None
        try:
            values = _loads("[" + seg[pos:end + 1] + "]")
        except ValueError:
            continue
        if values and all(isinstance(value, dict) for value in values):
            result.items.extend(values)
            return end + 1
        return None
    return None


def _objects(seg: str, start: int, end: int, result: ParseResult, budget: _Budget) -> None:
    """Objects separated by commas in seg[start:end]: one parse for all, else one per object."""
    try:
        result.items.extend(_loads("[" + seg[start:end] + "]"))
        return
    except ValueError:
        pass
    pos = start
    while pos < end and budget.take():
        span = _SPAN.match(seg, pos)
        assert span is not None  # the run matched objects here
        fragment = seg[pos:span.end()]
        try:
            result.items.append(_loads(fragment))
        except ValueError:
            result.errors.append(ParseError("item is not valid JSON", _clip(fragment)))
        comma = _COMMA.match(seg, span.end())
        pos = comma.end() if comma is not None else end


def _parse_block(text: str, example_keys: Collection[str] | None, result: ParseResult, budget: _Budget,
                 cut_off: bool = False) -> None:
    """One block of text (a fence's body, or the whole answer) holding JSON among prose.

    `cut_off`: the text is valid JSON up to its end, where its value is still open (orjson said so).
    """
    first = _OPENER.search(text)
    if first is None:
        if text.strip():
            result.errors.append(ParseError("no JSON found", _clip(text.strip())))
        return
    last = max(text.rfind("]"), text.rfind("}"))
    spans = None
    if cut_off and first.start() == len(text) - len(text.lstrip()):
        spans = [(first.start(), len(text), False)]
    elif last > first.start():
        try:
            result.items.extend(_unwrap(_loads(text[first.start():last + 1]), example_keys))
            return
        except ValueError as exc:
            if _ended_open(exc):  # valid JSON up to the last closer, still open there: cut off
                spans = [(first.start(), len(text), False)]
    else:
        spans = [(first.start(), len(text), False)]
    if spans is None:
        spans = _segments(text, budget)
    loaded = _load_closed([text[start:end] for start, end, closed in spans if closed])
    values = iter(loaded) if loaded is not None else None
    # (items, errors, holds objects) per segment: thousands of JSON lines take one pass here.
    parts: list[tuple[list[Any], list[ParseError], bool]] = []
    for start, end, closed in spans:
        value = (next(values) if values is not None else _load_one(text[start:end])) if closed else _FAILED
        if value is not _FAILED:
            items = _unwrap(value, example_keys)
            parts.append((items, [], any(isinstance(i, dict) for i in items)))
        else:
            part = ParseResult()
            _salvage(text[start:end], example_keys, part, budget)
            parts.append((part.items, part.errors, any(isinstance(i, dict) for i in part.items)))
    # Bracketed prose ("[5]") next to real output: keep only the parts that hold objects.
    if any(objects for _, _, objects in parts):
        parts = [p for p in parts if not p[0] or p[2]]
    for items, errors, _ in parts:
        result.items.extend(items)
        result.errors.extend(errors)


_FAILED = object()


def _load_one(segment: str) -> Any:
    try:
        return _loads(segment)
    except ValueError:
        return _FAILED


def _load_closed(segments: list[str]) -> list[Any] | None:
    """The values of closed segments (JSON lines, several blocks), `_FAILED` for those that do not
    parse: halves are parsed in one call each, so a few bad lines among thousands cost a few
    calls per bad line, not one per line. None when there are fewer than two."""
    if len(segments) < 2:
        return None
    values: list[Any] = []
    pending = [segments]
    while pending:
        group = pending.pop()
        try:
            loaded = _loads("[" + ",".join(group) + "]") if len(group) > 1 else [_loads(group[0])]
        except ValueError:
            loaded = None
        if isinstance(loaded, list) and len(loaded) == len(group):
            values.extend(loaded)
        elif len(group) == 1:
            values.append(_FAILED)
        else:
            middle = len(group) // 2
            pending += [group[middle:], group[:middle]]  # the first half is taken first
    return values


def _refuse(value: Any) -> Any:
    raise TypeError(type(value).__name__)


_STRUCTURE = bytes(set(range(256)) - set(b'"[]{}'))
_PARENS = bytes.maketrans(b"[{]}", b"(())")


def _nests_at_most(encoded: bytes, depth: int) -> bool:
    """Whether orjson's output `encoded` nests at most `depth` levels, in a few C passes over it.

    Escaped backslashes and quotes go first, so every quote left delimits a string; the strings'
    insides go with every byte but brackets; then each pass drops the innermost pairs, one level.
    """
    text = encoded.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _STRUCTURE)
    text = b"".join(text.split(b'"')[::2]).translate(_PARENS)
    for _ in range(depth):
        if not text:
            return True
        text = text.replace(b"()", b"")
    return not text


def _all_within(items: list[Any], max_depth: int, max_item_bytes: int) -> bool:
    """Whether no item repeats a key, nests past `max_depth` or encodes past `max_item_bytes`,
    decided in C for the whole answer (the per-item checks walk each item in Python)."""
    try:
        # Marked objects are dict subclasses: passed through, they reach `_refuse`.
        whole = orjson.dumps(items, default=_refuse, option=orjson.OPT_PASSTHROUGH_SUBCLASS)
    except TypeError:
        return False
    if not _nests_at_most(whole, max_depth + 1):
        return False
    return len(whole) <= max_item_bytes or max(map(len, map(orjson.dumps, items))) <= max_item_bytes


def _screen(result: ParseResult, max_depth: int, max_item_bytes: int) -> ParseResult:
    """Move items with a repeated key, or nested or sized past the bounds, to the errors."""
    if not result.items or _all_within(result.items, max_depth, max_item_bytes):
        return result
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
    if example_keys is not None and not isinstance(example_keys, frozenset):
        example_keys = frozenset(example_keys)  # looked up once per object of the answer
    if raw is None or not raw.strip():
        result.errors.append(ParseError("empty output", ""))
        return result
    try:
        result.items.extend(_unwrap(_checked(raw, orjson.loads(raw)), example_keys))
        return result
    except orjson.JSONDecodeError as exc:
        cut_off = _ended_open(exc)
    budget = _Budget()
    if "```" in raw:
        blocks = [m.group(1) for m in _FENCE.finditer(raw) if m.group(1).strip()]
        for block in blocks:
            _parse_block(block, example_keys, result, budget)
        if result.items or blocks:
            return _noted(result, budget)
    _parse_block(raw, example_keys, result, budget, cut_off)
    return _noted(result, budget)


def _noted(result: ParseResult, budget: _Budget) -> ParseResult:
    if budget.spent:
        result.errors.append(ParseError(f"more than {MAX_FRAGMENTS} bracketed values; the rest of the answer was not read", ""))
    return result

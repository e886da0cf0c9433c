"""How the simulator answers verification calls (label checks).

It knows the items it wrote, so it can play a verifier that knows the truth: a blind item it
wrote gets back the label it was written with, except for a share `1 - verify_agreement` of items
that get another label of the space. Items it never wrote get a label drawn from the space.
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict, deque
from typing import Any

import orjson

from datacreator.logic.verify import VERIFY_SYSTEM_PROMPT, blind, get_label

from .generate import content_text

_FENCE = re.compile(r"```json[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)
_FIELD = re.compile(r'each with its "([^"]+)" field removed')
_SPACE = re.compile(r"one of: (.*?)\. Judge only", re.DOTALL)
_REMEMBERED = 20_000
_MISSING = get_label({}, "x")


def _key(item: Any) -> bytes:
    return orjson.dumps(item, option=orjson.OPT_SORT_KEYS)


def is_verification(body: dict[str, Any]) -> bool:
    messages = body.get("messages") or []
    first = messages[0] if messages and isinstance(messages[0], dict) else {}
    return first.get("role") == "system" and content_text(first.get("content")) == VERIFY_SYSTEM_PROMPT


class Verifier:
    """Items written lately (bounded) and, per label field, their blind form -> label."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque(maxlen=_REMEMBERED)
        self._index: dict[str, OrderedDict[bytes, Any]] = {}

    def remember(self, answer: str) -> None:
        try:
            items = orjson.loads(answer).get("examples")
        except (orjson.JSONDecodeError, AttributeError):
            return
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict):
                self._items.append(item)
                for field, index in self._index.items():
                    self._add(index, field, item)

    def _add(self, index: OrderedDict[bytes, Any], field: str, item: dict) -> None:
        label = get_label(item, field)
        if label is not _MISSING:
            index[_key(blind(item, field))] = label
            while len(index) > _REMEMBERED:
                index.popitem(last=False)

    def truth(self, field: str, item: Any) -> Any:
        index = self._index.get(field)
        if index is None:
            index = self._index[field] = OrderedDict()
            for known in self._items:
                self._add(index, field, known)
        return index.get(_key(item), _MISSING)

    def answer(self, rng: random.Random, body: dict[str, Any], agreement: float) -> str | None:
        """`{"labels": [...]}` for a verification call; None for any other call."""
        if not is_verification(body):
            return None
        user = content_text(body["messages"][-1].get("content"))
        field = _FIELD.search(user)
        items = []
        for block in _FENCE.findall(user):
            try:
                items.append(orjson.loads(block))
            except orjson.JSONDecodeError:
                items.append(None)
        space = _space(user, body.get("response_format"))
        labels = []
        for item in items:
            label = self.truth(field.group(1), item) if field else _MISSING
            if label is _MISSING:
                label = rng.choice(space) if space else None
            elif space and rng.random() >= agreement:
                others = [v for v in space if _key(v) != _key(label)]
                label = rng.choice(others) if others else label
            labels.append(label)
        return orjson.dumps({"labels": labels}).decode()


def _space(user: str, response_format: Any) -> list[Any] | None:
    """The label space: the schema's enum, else the prompt's list."""
    try:
        enum = response_format["json_schema"]["schema"]["properties"]["labels"]["items"]["enum"]
        if isinstance(enum, list) and enum:
            return enum
    except (KeyError, TypeError):
        pass
    match = _SPACE.search(user)
    if match:
        try:
            return orjson.loads("[" + match.group(1) + "]")
        except orjson.JSONDecodeError:
            return None
    return None

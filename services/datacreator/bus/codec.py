"""Bytes on the wire: every message is UTF-8 JSON of a contract model; keys are request ids."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from datacreator.contracts import RequestMessage

M = TypeVar("M", bound=BaseModel)

_request_adapter: TypeAdapter[Any] = TypeAdapter(RequestMessage)


class PoisonMessage(Exception):
    """A message that can never be processed (not JSON, wrong schema, too large): it goes to the DLQ."""


def encode(message: BaseModel) -> bytes:
    return orjson.dumps(message.model_dump(mode="json"))


def encode_key(key: str | None) -> bytes | None:
    return key.encode() if key is not None else None


def decode_key(key: bytes | None) -> str | None:
    return key.decode("utf-8", "replace") if key is not None else None


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "message"
        parts.append(f"{where}: {item['msg']}")
    more = f" (+{error.error_count() - 5} more)" if error.error_count() > 5 else ""
    return "; ".join(parts) + more


def decode(model: type[M], value: bytes | None, max_bytes: int | None = None) -> M:
    if value is None:
        raise PoisonMessage("empty message (no value)")
    if max_bytes is not None and len(value) > max_bytes:
        raise PoisonMessage(f"message of {len(value)} bytes exceeds the limit of {max_bytes}")
    try:
        return model.model_validate_json(value)
    except ValidationError as exc:
        raise PoisonMessage(f"invalid {model.__name__}: {_describe(exc)}") from None


def decode_request(value: bytes | None, max_bytes: int | None = None) -> Any:
    """A CreationRequest or a CancelRequest, told apart by `kind` (absent means create)."""
    if value is None:
        raise PoisonMessage("empty message (no value)")
    if max_bytes is not None and len(value) > max_bytes:
        raise PoisonMessage(f"message of {len(value)} bytes exceeds the limit of {max_bytes}")
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise PoisonMessage(f"not JSON: {exc}") from None
    if isinstance(raw, dict) and "kind" not in raw:
        raw["kind"] = "create"
    try:
        return _request_adapter.validate_python(raw)
    except ValidationError as exc:
        raise PoisonMessage(f"invalid request: {_describe(exc)}") from None


Decoder = Callable[[bytes | None, int | None], Any]


def decoder(model: Any) -> Decoder:
    """How the runner turns the bytes of a handler's input topic into its declared model: a
    contract model, or `RequestMessage` (a creation or a cancel request)."""
    if model is RequestMessage:
        return decode_request
    if isinstance(model, type) and issubclass(model, BaseModel):
        return lambda value, max_bytes=None: decode(model, value, max_bytes)
    raise TypeError(f"cannot decode into {model!r}: declare a pydantic model or RequestMessage")


def request_id_in(message: Any) -> str | None:
    """The request a decoded message belongs to (its key must be this id), or None."""
    request_id = getattr(message, "request_id", None)
    if request_id is None:
        request_id = getattr(getattr(message, "task", None), "request_id", None)
    return request_id if isinstance(request_id, str) else None


def request_id_of(value: bytes | None, key: str | None) -> str | None:
    """Best effort: the request id of a message that failed validation, to answer it REJECTED.

    Only an id the key agrees with: the key decides the partition, so only then does the
    planner reading the message hold that request and know it was never accepted. A message
    naming another request's id answers nothing (it still goes to the DLQ).
    """
    named = None
    try:
        raw = orjson.loads(value) if value else None
        if isinstance(raw, dict) and "request_id" in raw:
            named = raw["request_id"] if isinstance(raw["request_id"], str) else ""
    except orjson.JSONDecodeError:
        pass
    if named is not None and named != key:
        return None
    return key if key and len(key) <= 128 else None

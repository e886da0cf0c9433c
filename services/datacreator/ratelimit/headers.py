"""What providers say about their limits: `x-ratelimit-*`, `Retry-After` and `retry-after-ms`."""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: str | None) -> float | None:
    """Seconds in `1s`, `6m0s`, `250ms`, `0.5` (seconds), or an epoch timestamp; None when unreadable."""
    if value is None:
        return None
    text = value.strip().lower()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return None
        return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if number > 1e9:  # an epoch timestamp rather than a duration
        return max(0.0, number - time.time())
    return max(0.0, number)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a 429 or 503 asks to wait: `retry-after-ms`, then `retry-after` (seconds or an HTTP date)."""
    h = lower(headers)
    if "retry-after-ms" in h:
        try:
            return max(0.0, float(h["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = h.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class ProviderView:
    """What the provider says is left, read from `x-ratelimit-*` headers."""

    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    # The limits themselves (`x-ratelimit-limit-*`), per the provider's window: a key moved to
    # another tier announces its new limit here before any 429.
    limit_requests: int | None = None
    limit_tokens: int | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> ProviderView:
        h = lower(headers)
        return cls(
            remaining_requests=_int(h.get("x-ratelimit-remaining-requests")),
            reset_requests_s=parse_duration(h.get("x-ratelimit-reset-requests")),
            remaining_tokens=_int(h.get("x-ratelimit-remaining-tokens")),
            reset_tokens_s=parse_duration(h.get("x-ratelimit-reset-tokens")),
            limit_requests=_positive(h.get("x-ratelimit-limit-requests")),
            limit_tokens=_positive(h.get("x-ratelimit-limit-tokens")),
        )

    def reset_after(self) -> float | None:
        """Seconds until the provider's limits recover (the later of the two), for a 429 without Retry-After."""
        values = [v for v in (self.reset_requests_s, self.reset_tokens_s) if v is not None]
        return max(values) if values else None


def backoff_after_429(headers: Mapping[str, str]) -> float | None:
    """How long a 429 asks every caller of the endpoint to pause: Retry-After, else the reset headers."""
    retry_after = parse_retry_after(headers)
    return retry_after if retry_after is not None else ProviderView.from_headers(headers).reset_after()


def reset_or_window(seconds: float | None, window_s: float) -> float:
    return window_s if seconds is None else seconds


def lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def _positive(value: str | None) -> int | None:
    number = _int(value)
    return number if number is not None and number > 0 else None


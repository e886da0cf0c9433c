"""What every rate limiter offers, the reservation it hands out, and the hooks it reports through.

Limiters never import metrics: the caller passes `Hooks` (the LLM client passes ones that update
Prometheus), so the package stays usable and testable without a metrics registry.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

DEFAULT_WINDOW_S = 60.0
REQUESTS = "requests"
TOKENS = "tokens"


@dataclass
class Reservation:
    """What one admitted call holds against the limits."""

    tokens: int
    waited_s: float = 0.0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    source: str = "local"  # local | shared | none
    # The window as this limiter saw it right after admitting the call: what the provider's
    # x-ratelimit-remaining-* headers on its answer are compared with.
    requests_in_window: int | None = None
    tokens_in_window: int | None = None
    _handle: Any = field(default=None, repr=False)


def _no_usage(alias: str, ratios: dict[str, float]) -> None:
    return None


def _no_fallback(alias: str, active: bool) -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    """Where a limiter reports what it sees: the share of each limit in use, and failover state."""

    usage: Callable[[str, dict[str, float]], None] = _no_usage
    fallback: Callable[[str, bool], None] = _no_fallback


NO_HOOKS = Hooks()


@runtime_checkable
class RateLimiter(Protocol):
    async def acquire(self, tokens: int) -> Reservation: ...

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None: ...

    async def hold(self, seconds: float) -> None:
        """Pause every caller of the endpoint (a 429's Retry-After), not just the one that was refused."""
        ...

    def observe_headers(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None: ...

    def usage_ratio(self) -> dict[str, float]: ...

    async def aclose(self) -> None: ...


class RateLimiterUnavailable(ConnectionError):
    """The shared limiter's store cannot be reached."""


def default_margin(window_s: float) -> float:
    """Extra window length covering the delay between admission here and arrival at the provider."""
    return min(max(0.005 * window_s, 0.05), 0.5)


def default_token_burst(span_s: float, burst_s: float) -> float:
    """How far (seconds) token pacing may run ahead: a tenth of the window, so one large call still
    goes out at once, while what any stretch of the window admits stays bounded (what failover relies on)."""
    return max(burst_s, 0.1 * span_s)


def default_burst(span_s: float, rpm: int | None) -> float:
    """How far (seconds) request pacing may run ahead of its schedule: a few requests' worth."""
    if not rpm:
        return 0.0
    return max(3 * span_s / rpm, 0.01 * span_s)


class NoopRateLimiter:
    """For endpoints without configured limits: admits everything at once."""

    async def acquire(self, tokens: int) -> Reservation:
        return Reservation(tokens=tokens, source="none")

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        return None

    async def hold(self, seconds: float) -> None:
        return None

    def observe_headers(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None:
        return None

    def usage_ratio(self) -> dict[str, float]:
        return {}

    async def aclose(self) -> None:
        return None

"""Retry delays and a per-endpoint circuit breaker."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

log = logging.getLogger("datacreator.llm")


@dataclass
class RetryPolicy:
    """How many attempts a call gets and how long to wait between them.

    A 429 waits what the provider asked for (Retry-After); other transient faults back off
    exponentially, with full jitter so that many callers do not retry in step.
    """

    max_attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 30.0
    jitter: Literal["full", "none"] = "full"
    max_retry_after_s: float = 120.0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after_s)
        ceiling = min(self.cap_s, self.base_s * 2 ** max(attempt - 1, 0))
        return self.rng.uniform(0.0, ceiling) if self.jitter == "full" else ceiling


class CircuitState(StrEnum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


class CircuitBreaker:
    """Stops calling an endpoint after `failure_threshold` failures in a row.

    After `reset_after_s` one probe goes through (half-open): its success closes the circuit,
    its failure opens it again. 429s are not failures: pacing is the rate limiter's job.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_after_s: float = 30.0,
        *,
        alias: str = "default",
        clock: Callable[[], float] = time.monotonic,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        # on_state(is_open) is how a caller watches the circuit (a metric); logic/ keeps none itself.
        self.on_state = on_state
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self.alias = alias
        self._clock = clock
        self._state = CircuitState.closed
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self._notify(False)

    def _notify(self, is_open: bool) -> None:
        if self.on_state is not None:
            self.on_state(is_open)

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.open and self._clock() - self._opened_at >= self.reset_after_s:
            return CircuitState.half_open
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through."""
        if self._state is not CircuitState.open:
            return 0.0
        return max(0.0, self._opened_at + self.reset_after_s - self._clock())

    def allow(self) -> bool:
        state = self.state
        if state is CircuitState.closed:
            return True
        if state is CircuitState.open:
            return False
        if self._state is CircuitState.open:  # the timeout just ran out: this caller is the probe
            self._state = CircuitState.half_open
            self._probe_in_flight = False
        if self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def record_success(self) -> None:
        if self._state is not CircuitState.closed:
            log.info("circuit closed for endpoint %s", self.alias)
        self._state = CircuitState.closed
        self._failures = 0
        self._probe_in_flight = False
        self._notify(False)

    def record_neutral(self) -> None:
        """An answer that says nothing of the endpoint's health (a 429, a cancelled call): frees the probe."""
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._state is CircuitState.half_open or (
            self._state is CircuitState.closed and self._failures >= self.failure_threshold
        ):
            if self._state is CircuitState.closed:
                log.warning(
                    "circuit opened for endpoint %s after %d failures in a row; next probe in %gs",
                    self.alias, self._failures, self.reset_after_s,
                )
            self._state = CircuitState.open
            self._opened_at = self._clock()
            self._probe_in_flight = False
            self._notify(True)

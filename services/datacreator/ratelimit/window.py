"""The sliding-window log every limiter here is built on, and the measure tests and benchmarks use.

A call is admitted only when the calls (and their tokens) admitted during the last window, plus
this one, fit the limit. Unlike a token bucket, that never lets more than the limit through in any
window, whatever the phase. A small margin is added to the window because a call reaches the
provider a little after it was admitted here. Pure code: no I/O, no clock of its own.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence

from datacreator.ratelimit.base import NO_HOOKS, Hooks, Reservation, default_burst, default_margin, default_token_burst
from datacreator.ratelimit.headers import ProviderView


class SlidingLog:
    """Weighted admissions in a sliding window, plus holds that expire at a set time."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self.events: deque[list[float]] = deque()  # [admitted_at, weight], in admission order
        self.total = 0.0
        self.holds: list[tuple[float, float]] = []  # (expires_at, weight)

    def expire(self, now: float) -> None:
        cutoff = now - self.span_s
        events = self.events
        while events and events[0][0] <= cutoff:
            self.total -= events.popleft()[1]
        if self.holds:
            self.holds = [h for h in self.holds if h[0] > now]
        if not events:
            self.total = 0.0  # no float drift across quiet periods

    def used(self) -> float:
        return self.total + sum(w for _, w in self.holds)

    def wait(self, need: float, limit: float, now: float) -> float:
        """Seconds until `need` more fits under `limit`."""
        excess = self.used() + need - limit
        if excess <= 1e-9:
            return 0.0
        if self.holds:
            expiries = sorted([(t + self.span_s, w) for t, w in self.events] + self.holds)
        else:
            expiries = ((t + self.span_s, w) for t, w in self.events)
        freed = 0.0
        for expires_at, weight in expiries:
            freed += weight
            if freed >= excess - 1e-9:
                return max(expires_at - now, 0.0)
        return self.span_s  # cannot happen while need <= limit; wait a window to be safe

    def add(self, now: float, weight: float) -> list[float]:
        entry = [now, weight]
        self.events.append(entry)
        self.total += weight
        return entry

    def hold(self, weight: float, expires_at: float) -> None:
        self.holds.append((expires_at, weight))


class WindowLimits:
    """The limits, window, margin and pacing burst that the local and the shared limiter both keep."""

    def __init__(
        self, rpm: int | None, tpm: int | None, window_s: float, margin_s: float | None, burst_s: float | None,
        alias: str, hooks: Hooks = NO_HOOKS,
    ) -> None:
        # What the endpoint is configured with, and (rpm, tpm) what is enforced: lower when the
        # provider announces a lower limit, never higher than configured.
        self.configured_rpm = rpm
        self.configured_tpm = tpm
        self.rpm = rpm
        self.tpm = tpm
        self.window_s = window_s
        self.margin_s = default_margin(window_s) if margin_s is None else margin_s
        self.alias = alias
        self.hooks = hooks
        self._span_s = window_s + self.margin_s
        self.burst_s = default_burst(self._span_s, rpm) if burst_s is None else burst_s
        self.token_burst_s = default_token_burst(self._span_s, self.burst_s)

    @property
    def span_s(self) -> float:
        return self._span_s

    def announced(self, view: ProviderView) -> tuple[int | None, int | None]:
        """The limits to enforce after the provider's `x-ratelimit-limit-*`: the configured ones,
        lowered to what it announces (a header it leaves out keeps the limit as it is)."""
        rpm, tpm = self.rpm, self.tpm
        if view.limit_requests is not None and self.configured_rpm:
            rpm = min(self.configured_rpm, view.limit_requests)
        if view.limit_tokens is not None and self.configured_tpm:
            tpm = min(self.configured_tpm, view.limit_tokens)
        return rpm, tpm

    def _clamp(self, tokens: int) -> int:
        tokens = max(int(tokens), 0)
        return min(tokens, self.tpm) if self.tpm else tokens

    def usage_ratio(self) -> dict[str, float]:
        raise NotImplementedError

    def _publish(self) -> None:
        self.hooks.usage(self.alias, self.usage_ratio())


def in_window(reservation: Reservation | None, requests_now: float, tokens_now: float) -> tuple[float, float]:
    """The window a provider's headers are compared with: as it was when the call was admitted."""
    if reservation is None or reservation.requests_in_window is None:
        return requests_now, tokens_now
    return reservation.requests_in_window, reservation.tokens_in_window or 0


def max_in_window(times: Sequence[float], window_s: float, weights: Sequence[float] | None = None) -> float:
    """The most admissions (or, with `weights`, the most weight) inside any window of `window_s` seconds.

    Windows are half-open, [t, t + window_s), as providers count them.
    """
    if weights is None:
        ordered = sorted(times)
        return max((bisect.bisect_left(ordered, t + window_s, lo=i) - i for i, t in enumerate(ordered)), default=0)
    pairs = sorted(zip(times, weights))
    best = total = 0.0
    end = 0
    for start, weight in pairs:  # two pointers over windows starting at each admission
        while end < len(pairs) and pairs[end][0] < start + window_s:
            total += pairs[end][1]
            end += 1
        best = max(best, total)
        total -= weight
    return best



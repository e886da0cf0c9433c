"""Requests and tokens per window in one process.

Requests and tokens are also paced (GCRA: one request every window/rpm, a token every window/tpm,
with a small burst allowance). Without it the
first window's burst repeats every window, and a burst reaches the provider spread out by its own
queueing, so the provider's window and ours drift apart by more than the margin. Paced calls
arrive as they were sent, and the whole quota is still used.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from datacreator.ratelimit.base import DEFAULT_WINDOW_S, NO_HOOKS, REQUESTS, TOKENS, Hooks, Reservation
from datacreator.ratelimit.headers import ProviderView, reset_or_window
from datacreator.ratelimit.window import SlidingLog, WindowLimits, in_window


class LocalRateLimiter(WindowLimits):
    """Requests and tokens per window, in this process only. Waiters are served first come, first served."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        margin_s: float | None = None,
        burst_s: float | None = None,
        alias: str = "default",
        hooks: Hooks = NO_HOOKS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(rpm, tpm, window_s, margin_s, burst_s, alias, hooks)
        self._clock = clock
        self._requests = SlidingLog(self._span_s)
        self._tokens = SlidingLog(self._span_s)
        self._interval = self._span_s / rpm if rpm else 0.0
        self._token_interval = self._span_s / tpm if tpm else 0.0
        self._tat = 0.0  # when the next request is due by the pacing schedule
        self._token_tat = 0.0  # the same for tokens
        self._hold_until = 0.0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    def _wait(self, now: float, tokens: int) -> float:
        self._requests.expire(now)
        self._tokens.expire(now)
        wait = max(self._hold_until - now, 0.0)
        if self.rpm:
            wait = max(wait, self._tat - now - self.burst_s, self._requests.wait(1, self.rpm, now))
        if self.tpm:
            wait = max(wait, self._token_tat - now - self.token_burst_s, self._tokens.wait(tokens, self.tpm, now))
        return wait

    async def acquire(self, tokens: int) -> Reservation:
        tokens = self._clamp(tokens)
        started = self._clock()
        async with self._lock:
            while True:
                now = self._clock()
                wait = self._wait(now, tokens)
                if wait <= 0:
                    break
                self._changed.clear()
                try:  # a settle that frees tokens wakes the head of the queue early
                    await asyncio.wait_for(self._changed.wait(), wait)
                except TimeoutError:
                    pass
            self._requests.add(now, 1)
            self._tat = max(self._tat, now) + self._interval
            self._token_tat = max(self._token_tat, now) + tokens * self._token_interval
            entry = self._tokens.add(now, tokens)
            counted = (round(self._requests.used()), round(self._tokens.used()))
        self._publish()
        return Reservation(
            tokens=tokens, waited_s=now - started, source="local",
            requests_in_window=counted[0], tokens_in_window=counted[1], _handle=entry,
        )

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        entry = reservation._handle
        if entry is None:
            return
        now = self._clock()
        self._tokens.expire(now)
        actual = self._clamp(actual_tokens)
        if entry[0] > now - self._tokens.span_s and entry[1] != actual:  # still counted
            self._tokens.total += actual - entry[1]
            self._token_tat += (actual - entry[1]) * self._token_interval
            entry[1] = actual
            reservation.tokens = actual
            self._changed.set()
        self._publish()

    def seed_full(self, rpm: int | None, tpm: int | None, now: float | None = None) -> None:
        """Take new limits and assume the window was full up to `now`, admitted at the paced rate.

        What a replica does when the shared store fails: what the others admitted is unknown, so it
        assumes the worst that pacing allows — the whole limit over the last window, plus a burst
        just now — and admits only as that frees up.
        """
        now = self._clock() if now is None else now
        self.configured_rpm, self.configured_tpm = rpm, tpm
        self._set_limits(rpm, tpm)
        self._requests = SlidingLog(self._span_s)
        self._tokens = SlidingLog(self._span_s)
        slices = 50
        for log, limit, burst in ((self._requests, rpm, self.burst_s), (self._tokens, tpm, self.token_burst_s)):
            if not limit:
                continue
            step = self._span_s / slices
            for i in range(slices):
                log.add(now - self._span_s + (i + 1) * step, limit / slices)
            log.hold(limit * burst / self._span_s, now + self._span_s)
        self._tat = now + self.burst_s
        self._token_tat = now + self.token_burst_s
        self._changed.set()

    def _set_limits(self, rpm: int | None, tpm: int | None) -> None:
        self.rpm, self.tpm = rpm, tpm
        self._interval = self._span_s / rpm if rpm else 0.0
        self._token_interval = self._span_s / tpm if tpm else 0.0
        self._changed.set()

    def admissions(self, since: float) -> list[tuple[float, float]]:
        """(admitted_at, tokens) of what this limiter admitted after `since` and still counts."""
        now = self._clock()
        self._tokens.expire(now)
        return [(t, w) for t, w in self._tokens.events if t > since]

    async def hold(self, seconds: float) -> None:
        """Admit nothing for `seconds` (the provider asked to back off)."""
        self._hold_until = max(self._hold_until, self._clock() + seconds)

    async def wait_for_hold(self) -> None:
        """Sleep out a hold set here (the failover limiter honours it on the shared path too)."""
        while (left := self._hold_until - self._clock()) > 0:
            await asyncio.sleep(left)

    def observe_headers(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None:
        view = ProviderView.from_headers(headers)
        limits = self.announced(view)
        if limits != (self.rpm, self.tpm):
            self._set_limits(*limits)
            self._publish()
        if view.remaining_requests is None and view.remaining_tokens is None:
            return
        now = self._clock()
        self._requests.expire(now)
        self._tokens.expire(now)
        # The headers describe the provider's window when it admitted the call, so they are
        # compared with ours at that moment. The provider counts something we did not (another
        # client on the same key, a different tokenizer): hold the difference until its reset.
        ours_requests, ours_tokens = in_window(reservation, self._requests.used(), self._tokens.used())
        if self.rpm and view.remaining_requests is not None:
            deficit = (self.rpm - ours_requests) - view.remaining_requests
            if deficit >= 1:
                self._requests.hold(deficit, now + reset_or_window(view.reset_requests_s, self.window_s))
        if self.tpm and view.remaining_tokens is not None:
            deficit = (self.tpm - ours_tokens) - view.remaining_tokens
            if deficit >= 1:
                self._tokens.hold(deficit, now + reset_or_window(view.reset_tokens_s, self.window_s))

    def usage_ratio(self) -> dict[str, float]:
        now = self._clock()
        ratios: dict[str, float] = {}
        if self.rpm:
            self._requests.expire(now)
            ratios[REQUESTS] = self._requests.used() / self.rpm
        if self.tpm:
            self._tokens.expire(now)
            ratios[TOKENS] = self._tokens.used() / self.tpm
        return ratios

    async def aclose(self) -> None:
        return None

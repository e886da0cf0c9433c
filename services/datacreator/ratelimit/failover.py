"""The shared limiter, with a local share of the limit while Redis is away, and the factory."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from datacreator.ratelimit.base import (
    DEFAULT_WINDOW_S,
    NO_HOOKS,
    Hooks,
    NoopRateLimiter,
    RateLimiter,
    RateLimiterUnavailable,
    Reservation,
)
from datacreator.ratelimit.local import LocalRateLimiter
from datacreator.ratelimit.redis import RedisRateLimiter

log = logging.getLogger("datacreator.ratelimit")


class FailoverRateLimiter:
    """The shared limiter, or a local share of the limit while its store is unreachable.

    The share is 1 / the live replicas last seen in Redis (`initial_replicas` before Redis was ever
    reached), so replicas that all fall back together still stay under the provider's limit. On the
    switch the local window is seeded as if the shared one were full up to now, so what Redis
    admitted just before is not admitted twice; on recovery what was admitted locally is carried
    back into Redis. One slow answer is not an outage: it takes `failures_to_fall_back` in a row.
    """

    def __init__(
        self,
        shared: RedisRateLimiter,
        initial_replicas: int = 1,
        *,
        probe_interval_s: float = 5.0,
        failures_to_fall_back: int = 3,
    ) -> None:
        if initial_replicas < 1:
            raise ValueError("initial_replicas must be at least 1")
        self.shared = shared
        shared.members = initial_replicas
        self.probe_interval_s = probe_interval_s
        self.failures_to_fall_back = max(failures_to_fall_back, 1)
        self.alias = shared.alias
        self.hooks = shared.hooks
        self.local = LocalRateLimiter(
            _share(shared.rpm, 1 / initial_replicas),
            _share(shared.tpm, 1 / initial_replicas),
            window_s=shared.window_s,
            margin_s=shared.margin_s,
            burst_s=shared.burst_s,
            alias=shared.alias,
            hooks=shared.hooks,
        )
        self._fallback = False
        self._fallback_since = 0.0
        self._failures = 0
        self._flips = 0
        self._next_probe = 0.0
        self._probing = False
        self.hooks.fallback(self.alias, False)

    @property
    def in_fallback(self) -> bool:
        return self._fallback

    @property
    def local_share(self) -> float:
        return 1 / max(self.shared.members, 1)

    def _enter_fallback(self, exc: BaseException) -> None:
        if self._fallback:
            return
        self._fallback = True
        self._fallback_since = time.monotonic()
        self._next_probe = self._fallback_since + self.probe_interval_s
        share = self.local_share
        self.local.seed_full(_share(self.shared.rpm, share), _share(self.shared.tpm, share), self._fallback_since)
        self.hooks.fallback(self.alias, True)
        log.warning(
            "shared rate limit for endpoint %s unavailable (%s); using a local share of %.0f%% until it returns",
            self.alias, exc, share * 100,
        )

    async def _probe(self) -> None:
        if self._probing:
            return
        self._probing = True
        try:
            if await self.shared.ping():
                try:
                    await self.shared.carry(self.local.admissions(self._fallback_since), time.monotonic())
                    await self.shared.register()
                except RateLimiterUnavailable:
                    self._next_probe = time.monotonic() + self.probe_interval_s
                    return
                self._fallback = False
                self._flips += 1
                self._failures = 0
                self.hooks.fallback(self.alias, False)
                log.info("shared rate limit for endpoint %s is back", self.alias)
            else:
                self._next_probe = time.monotonic() + self.probe_interval_s
        finally:
            self._probing = False

    async def acquire(self, tokens: int) -> Reservation:
        while True:
            if self._fallback and time.monotonic() >= self._next_probe:
                await self._probe()
            if self._fallback:
                flips = self._flips
                reservation = await self.local.acquire(tokens)
                if self._probing or self._flips != flips:
                    # Admitted while what was admitted locally is being carried to Redis, or after
                    # the switch back: Redis would never learn of it, so ask again.
                    continue
                return reservation
            try:
                await self.local.wait_for_hold()
                reservation = await self.shared.acquire(tokens)
            except RateLimiterUnavailable as exc:
                self._failures += 1
                if self._failures >= self.failures_to_fall_back:
                    self._enter_fallback(exc)
                else:
                    await asyncio.sleep(min(0.05 * self._failures, 0.5))
                continue
            self._failures = 0
            return reservation

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        if reservation.source == "shared":
            try:
                await self.shared.settle(reservation, actual_tokens)
            except RateLimiterUnavailable as exc:
                self._enter_fallback(exc)
        else:
            await self.local.settle(reservation, actual_tokens)

    async def hold(self, seconds: float) -> None:
        # Locally as well: it still holds if Redis goes away before the hold ends.
        await self.local.hold(seconds)
        if not self._fallback:
            try:
                await self.shared.hold(seconds)
            except RateLimiterUnavailable as exc:
                self._enter_fallback(exc)

    def observe_headers(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None:
        if reservation is not None and reservation.source == "shared":
            self.shared.observe_headers(headers, reservation)
        elif reservation is not None:
            self.local.observe_headers(headers, reservation)
        else:
            (self.local if self._fallback else self.shared).observe_headers(headers)

    def usage_ratio(self) -> dict[str, float]:
        return self.local.usage_ratio() if self._fallback else self.shared.usage_ratio()

    async def aclose(self) -> None:
        await self.shared.aclose()
        await self.local.aclose()


def _share(limit: int | None, share: float) -> int | None:
    if limit is None:
        return None
    return max(1, math.floor(limit * share))


def build_rate_limiter(
    alias: str,
    endpoint_cfg: Any,
    redis_url: str | None,
    replicas_hint: int = 1,
    *,
    window_s: float = DEFAULT_WINDOW_S,
    key_prefix: str = "datacreator:ratelimit",
    hooks: Hooks = NO_HOOKS,
) -> RateLimiter:
    """The limiter an endpoint needs: none, local, or shared through Redis with a local fallback."""
    rpm, tpm = endpoint_cfg.rpm, endpoint_cfg.tpm
    if not rpm and not tpm:
        return NoopRateLimiter()
    if redis_url:
        shared = RedisRateLimiter(redis_url, f"{key_prefix}:{alias}", rpm, tpm, window_s=window_s, alias=alias, hooks=hooks)
        return FailoverRateLimiter(shared, initial_replicas=max(replicas_hint, 1))
    return LocalRateLimiter(rpm, tpm, window_s=window_s, alias=alias, hooks=hooks)

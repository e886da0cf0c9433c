"""One sliding-window limit shared by every generator replica, atomic in Lua scripts on Redis's clock.

The scripts live next to this module (`lua/*.lua`, shipped as package data); `expire.lua` is the
prelude of each one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from datacreator.ratelimit.base import (
    DEFAULT_WINDOW_S,
    NO_HOOKS,
    REQUESTS,
    TOKENS,
    Hooks,
    RateLimiterUnavailable,
    Reservation,
)
from datacreator.ratelimit.headers import ProviderView, reset_or_window
from datacreator.ratelimit.window import WindowLimits, in_window

# Any error from the store means "unavailable": lost connections and timeouts, but also a read-only
# replica, an out-of-memory server or a cluster that is down.
STORE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


def _script(name: str) -> str:
    folder = resources.files("datacreator.ratelimit") / "lua"
    text = (folder / f"{name}.lua").read_text(encoding="utf-8")
    return (folder / "expire.lua").read_text(encoding="utf-8") + text if name in ("acquire", "sync", "carry") else text


class RedisRateLimiter(WindowLimits):
    """One sliding-window limit shared by every replica through Redis.

    Each decision is one Lua script run on Redis's clock, so replicas' clocks do not matter and two
    replicas never admit the same slot. Only one coroutine per replica polls Redis at a time; the
    others queue behind it in order.
    """

    def __init__(
        self,
        redis_url: str,
        key_prefix: str,
        rpm: int | None,
        tpm: int | None,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        margin_s: float | None = None,
        burst_s: float | None = None,
        alias: str = "default",
        hooks: Hooks = NO_HOOKS,
        op_timeout_s: float = 1.0,
        max_poll_s: float = 0.25,
        member_ttl_s: float = 15.0,
    ) -> None:
        super().__init__(rpm, tpm, window_s, margin_s, burst_s, alias, hooks)
        self.key_prefix = key_prefix
        # One hash tag keeps the keys in one slot of a Redis Cluster.
        self.keys = [
            f"{{{key_prefix}}}:requests", f"{{{key_prefix}}}:tokens", f"{{{key_prefix}}}:token_sum", f"{{{key_prefix}}}:tat",
            f"{{{key_prefix}}}:hold",
            f"{{{key_prefix}}}:token_tat",
            f"{{{key_prefix}}}:members",
            f"{{{key_prefix}}}:away",
            f"{{{key_prefix}}}:announced",
        ]
        self.member = uuid.uuid4().hex
        self.member_ttl_s = member_ttl_s
        self.members = 1  # live replicas sharing the limit, as last seen
        self._span_ms = self._span_s * 1000
        # Announced limits stay in Redis this long after the last answer that announced them.
        self.announced_ttl_s = 5 * self._span_s
        self._announced_at = -float("inf")
        self._interval_ms = self._span_ms / rpm if rpm else 0.0
        self._token_interval_ms = self._span_ms / tpm if tpm else 0.0
        self._op_timeout_s = op_timeout_s
        self._max_poll_s = max_poll_s
        self._redis = aioredis.Redis.from_url(
            redis_url, socket_timeout=op_timeout_s, socket_connect_timeout=op_timeout_s, retry_on_timeout=False
        )
        self._acquire_script = self._redis.register_script(_script("acquire"))
        self._settle_script = self._redis.register_script(_script("settle"))
        self._sync_script = self._redis.register_script(_script("sync"))
        self._hold_script = self._redis.register_script(_script("hold"))
        self._register_script = self._redis.register_script(_script("register"))
        self._carry_script = self._redis.register_script(_script("carry"))
        self._announce_script = self._redis.register_script(_script("announce"))
        self._announce_task: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._count = 0
        self._used = 0
        self._sync_task: asyncio.Task[None] | None = None

    async def _run(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            async with asyncio.timeout(self._op_timeout_s * 2):
                return await call()
        except STORE_ERRORS as exc:
            raise RateLimiterUnavailable(f"shared rate limiter store unreachable: {type(exc).__name__}: {exc}") from None

    async def acquire(self, tokens: int) -> Reservation:
        tokens = self._clamp(tokens)
        started = time.monotonic()
        rid = uuid.uuid4().hex
        args = [
            self.configured_rpm or 0, self.configured_tpm or 0, self._span_ms, tokens, rid, self._interval_ms, self.burst_s * 1000,
            self._token_interval_ms, self.token_burst_s * 1000, self.member, self.member_ttl_s * 1000,
        ]
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        async with self._lock:
            while True:
                admitted, value, count, used, members, rpm, tpm = await self._run(lambda: self._acquire_script(keys=self.keys, args=args))
                self._count, self._used, self.members = int(count), int(used), max(int(members), 1)
                self.rpm, self.tpm = int(rpm) or None, int(tpm) or None
                if int(admitted):
                    break
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), min(float(value) / 1000, self._max_poll_s))
                except TimeoutError:
                    pass
        self._publish()
        return Reservation(
            tokens=tokens, waited_s=time.monotonic() - started, id=rid, source="shared",
            requests_in_window=self._count, tokens_in_window=self._used, _handle=f"{rid}|{tokens}",
        )

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        member = reservation._handle
        actual = self._clamp(actual_tokens)
        if not isinstance(member, str) or actual == reservation.tokens:
            return
        new_member = f"{reservation.id}|{actual}"
        args = [member, new_member, actual - reservation.tokens, self._token_interval_ms]
        done = await self._run(lambda: self._settle_script(keys=[self.keys[1], self.keys[2], self.keys[5]], args=args))
        if int(done):
            self._used += actual - reservation.tokens
            reservation.tokens = actual
            reservation._handle = new_member
            self._changed.set()

    async def register(self) -> int:
        """Renew this replica's membership; the number of live replicas."""
        members = await self._run(lambda: self._register_script(keys=self.keys[6:7], args=[self.member, self.member_ttl_s * 1000]))
        self.members = max(int(members), 1)
        return self.members

    async def _beat(self) -> None:
        # Idle replicas stay counted: membership expires only when a replica is gone.
        while True:
            await asyncio.sleep(self.member_ttl_s / 3)
            try:
                await self.register()
            except RateLimiterUnavailable:
                pass

    async def carry(self, admissions: list[tuple[float, float]], now: float) -> None:
        """Put what was admitted locally (monotonic admission time, tokens) into the shared window."""
        args: list[Any] = [self.member, len(admissions), self._span_ms, self.member_ttl_s * 1000]
        for admitted_at, tokens in admissions:
            args += [max(now - admitted_at, 0.0) * 1000, int(tokens)]
        count, used = await self._run(lambda: self._carry_script(keys=[*self.keys[:3], self.keys[6], self.keys[7]], args=args))
        self._count, self._used = int(count), int(used)

    async def hold(self, seconds: float) -> None:
        """Admit nothing, in any replica, for `seconds` (the provider asked to back off)."""
        await self._run(lambda: self._hold_script(keys=self.keys[4:5], args=[seconds * 1000]))
        self._changed.set()

    async def sync(self, view: ProviderView) -> int:
        """Hold, in Redis, what the provider counts beyond our window. Returns how many holds were added."""
        args = [
            self.rpm or 0,
            self.tpm or 0,
            self._span_ms,
            -1 if view.remaining_requests is None else view.remaining_requests,
            reset_or_window(view.reset_requests_s, self.window_s) * 1000,
            -1 if view.remaining_tokens is None else view.remaining_tokens,
            reset_or_window(view.reset_tokens_s, self.window_s) * 1000,
            uuid.uuid4().hex,
        ]
        added, count, used = await self._run(lambda: self._sync_script(keys=self.keys[:3], args=args))
        self._count, self._used = int(count), int(used)
        return int(added)

    async def announce(self, rpm: int | None, tpm: int | None) -> None:
        """Enforce these limits (the provider's, at most the configured ones) in every replica."""
        def shared(limit: int | None, configured: int | None) -> int:
            return 0 if not limit or not configured or limit >= configured else limit  # 0: as configured

        args = [shared(rpm, self.configured_rpm), shared(tpm, self.configured_tpm), self.announced_ttl_s * 1000]
        self._announced_at = time.monotonic()
        await self._run(lambda: self._announce_script(keys=self.keys[8:9], args=args))
        self._changed.set()

    def _follow(self, view: ProviderView) -> None:
        """Take the limits the provider announces, now here and in Redis for the other replicas.
        Renewed about once a window while they hold, so they outlive a quiet spell only briefly."""
        if view.limit_requests is None and view.limit_tokens is None:
            return
        limits = self.announced(view)
        due = time.monotonic() - self._announced_at > self._span_s
        if limits == (self.rpm, self.tpm) and not (due and limits != (self.configured_rpm, self.configured_tpm)):
            return
        self.rpm, self.tpm = limits
        if self._announce_task is None or self._announce_task.done():
            self._announced_at = time.monotonic()
            self._announce_task = asyncio.get_running_loop().create_task(self._announce_quietly(*limits))

    async def _announce_quietly(self, rpm: int | None, tpm: int | None) -> None:
        try:
            await self.announce(rpm, tpm)
        except RateLimiterUnavailable:
            self._announced_at = -float("inf")  # try again on the next answer

    def observe_headers(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None:
        view = ProviderView.from_headers(headers)
        self._follow(view)
        if view.remaining_requests is None and view.remaining_tokens is None:
            return
        # Cheap local check first: only a provider that counts more than we did when it admitted
        # the call needs a round trip, which re-checks against the window as it is now.
        ours_requests, ours_tokens = in_window(reservation, self._count, self._used)
        short_requests = self.rpm and view.remaining_requests is not None and view.remaining_requests < self.rpm - ours_requests
        short_tokens = self.tpm and view.remaining_tokens is not None and view.remaining_tokens < self.tpm - ours_tokens
        if not (short_requests or short_tokens) or (self._sync_task and not self._sync_task.done()):
            return
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_quietly(view))

    async def _sync_quietly(self, view: ProviderView) -> None:
        try:
            await self.sync(view)
        except RateLimiterUnavailable:
            pass

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._op_timeout_s * 2):
                await self._redis.ping()
        except STORE_ERRORS:
            return False
        return True

    async def reset(self) -> None:
        """Forget every admission (tests and benchmarks)."""
        await self._run(lambda: self._redis.delete(*self.keys))

    def usage_ratio(self) -> dict[str, float]:
        ratios: dict[str, float] = {}
        if self.rpm:
            ratios[REQUESTS] = self._count / self.rpm
        if self.tpm:
            ratios[TOKENS] = self._used / self.tpm
        return ratios

    async def aclose(self) -> None:
        for task in (self._sync_task, self._heartbeat, self._announce_task):
            if task and not task.done():
                task.cancel()
        await self._redis.aclose()

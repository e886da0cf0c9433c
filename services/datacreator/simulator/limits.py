"""Provider-style rate limits: requests and tokens per sliding window of admitted requests."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """The outcome of one admission check, with what the x-ratelimit-* headers report."""

    admitted: bool
    limited_by: str | None  # "requests" or "tokens" when refused
    retry_after_s: float
    rpm: int | None
    tpm: int | None
    remaining_requests: int | None
    remaining_tokens: int | None
    reset_requests_s: float
    reset_tokens_s: float
    too_large: bool = False  # the request alone costs more than the token limit

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.rpm is not None:
            out["x-ratelimit-limit-requests"] = str(self.rpm)
            out["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            out["x-ratelimit-reset-requests"] = format_duration(self.reset_requests_s)
        if self.tpm is not None:
            out["x-ratelimit-limit-tokens"] = str(self.tpm)
            out["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            out["x-ratelimit-reset-tokens"] = format_duration(self.reset_tokens_s)
        if not self.admitted:
            out["retry-after"] = str(retry_after_header(self.retry_after_s))
        return out


def format_duration(seconds: float) -> str:
    """Like the providers' reset headers: '1.2s', '0.35s', '0s'."""
    return f"{max(0.0, round(seconds, 3)):g}s"


def retry_after_header(seconds: float) -> int:
    """Whole seconds, at least 1, never earlier than the wait."""
    return max(1, math.ceil(seconds))


class SlidingWindowLimiter:
    """Admits a request when the requests and tokens admitted in the last `window_s` leave room for it.

    Check and admission happen in one call with no await in between, so on one event loop the
    limits hold exactly: no window of `window_s` ever holds more than rpm requests or tpm tokens.
    """

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._entries: deque[tuple[float, int]] = deque()  # (admitted at, token cost), oldest first
        self._tokens = 0

    def clear(self) -> None:
        self._entries.clear()
        self._tokens = 0

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        entries = self._entries
        while entries and entries[0][0] <= horizon:
            self._tokens -= entries.popleft()[1]

    def try_admit(self, now: float, cost: int, rpm: int | None, tpm: int | None) -> Decision:
        self._prune(now)
        entries = self._entries
        count = len(entries)
        wait_requests = 0.0
        if rpm is not None and count + 1 > rpm:
            # the (count - rpm + 1) oldest must leave the window first
            wait_requests = entries[count - rpm][0] + self.window_s - now
        wait_tokens = 0.0
        too_large = tpm is not None and cost > tpm
        if tpm is not None and self._tokens + cost > tpm:
            if too_large:
                wait_tokens = self.window_s
            else:
                freed = 0
                for at, tokens in entries:
                    freed += tokens
                    if self._tokens - freed + cost <= tpm:
                        wait_tokens = at + self.window_s - now
                        break
        admitted = wait_requests <= 0 and wait_tokens <= 0
        if admitted:
            entries.append((now, cost))
            self._tokens += cost
            count += 1
        oldest_leaves = entries[0][0] + self.window_s - now if entries else 0.0
        return Decision(
            admitted=admitted,
            limited_by=None if admitted else ("requests" if wait_requests >= wait_tokens else "tokens"),
            retry_after_s=max(wait_requests, wait_tokens),
            rpm=rpm,
            tpm=tpm,
            remaining_requests=None if rpm is None else max(0, rpm - count),
            remaining_tokens=None if tpm is None else max(0, tpm - self._tokens),
            reset_requests_s=wait_requests if wait_requests > 0 else oldest_leaves,
            reset_tokens_s=wait_tokens if wait_tokens > 0 else oldest_leaves,
            too_large=too_large,
        )

"""Counters of the simulator, readable in-process (`SimulatorServer.stats`) and at `/sim/stats`."""

from __future__ import annotations

import threading
import time
from typing import Any

from datacreator.ratelimit.window import max_in_window


class SimulatorStats:
    """What the simulator received, admitted, answered and injected.

    Timestamps are `time.monotonic()` seconds of the simulator's process. The server thread
    writes while tests read from another thread, so changes and snapshots take a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.responses: dict[int, int] = {}
            self.timeouts_held = 0
            self.admitted_at: list[float] = []
            self.refused_at: list[float] = []  # monotonic times of the 429 answers, as admitted_at
            self.admitted_tokens: list[int] = []
            self.prompt_tokens = 0
            self.completion_tokens = 0
            self.faults: dict[str, int] = {}

    # -- written by the app -----------------------------------------------------------------

    def received(self) -> None:
        with self._lock:
            self.requests += 1

    def answered(self, status: int) -> None:
        with self._lock:
            self.responses[status] = self.responses.get(status, 0) + 1
            if status == 429:
                self.refused_at.append(time.monotonic())

    def admitted(self, at: float, cost: int) -> None:
        with self._lock:
            self.admitted_at.append(at)
            self.admitted_tokens.append(cost)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def fault(self, kind: str, times: int = 1) -> None:
        with self._lock:
            self.faults[kind] = self.faults.get(kind, 0) + times

    def held(self) -> None:
        with self._lock:
            self.timeouts_held += 1

    # -- read by tests and benchmarks --------------------------------------------------------

    def status(self, code: int) -> int:
        """How many answers had this status code."""
        return self.responses.get(code, 0)

    @property
    def admitted_count(self) -> int:
        return len(self.admitted_at)

    def max_admitted_in_window(self, window_s: float = 60.0) -> int:
        """The most requests admitted within any window of `window_s` seconds."""
        with self._lock:
            times = list(self.admitted_at)
        return int(max_in_window(times, window_s))

    def max_tokens_in_window(self, window_s: float = 60.0) -> int:
        """The most tokens (admission cost) admitted within any window of `window_s` seconds."""
        with self._lock:
            times, costs = list(self.admitted_at), list(self.admitted_tokens)
        return int(max_in_window(times, window_s, costs))

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON-ready data (what `/sim/stats` answers)."""
        with self._lock:
            data = {
                "requests": self.requests,
                "responses": {str(code): n for code, n in sorted(self.responses.items())},
                "timeouts_held": self.timeouts_held,
                "admitted": len(self.admitted_at),
                "admitted_at": list(self.admitted_at),
                "admitted_tokens": list(self.admitted_tokens),
                "refused_at": list(self.refused_at),
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "faults": dict(self.faults),
            }
        data["max_admitted_in_60s"] = self.max_admitted_in_window(60.0)
        data["max_tokens_in_60s"] = self.max_tokens_in_window(60.0)
        return data

"""When the state a service keeps for an ended request may go.

Services keep something per request: the planner its plan, every service the latest status, the
curator its dedup state. Once a request is final that state only serves stragglers (a redelivered
task, a late candidate or outcome), which come soon after the end; kept for ever it grows with
every request a long-running service has seen. `ReleaseClock` holds each ended request for
`after_s`, then hands its id back to be released, and remembers a bounded number of released ids
with their final state, so that a straggler after the release is still known to be closed.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from datacreator.contracts import RequestState

DEFAULT_REMEMBERED = 100_000  # released ids kept (about 100 bytes each)


class ReleaseClock:
    def __init__(self, after_s: float, remembered: int = DEFAULT_REMEMBERED) -> None:
        self.after_s = after_s
        self._due: dict[str, tuple[float, RequestState]] = {}
        self._heap: list[tuple[float, str]] = []
        self._released: OrderedDict[str, RequestState] = OrderedDict()
        self._remembered = remembered

    def ended(self, request_id: str, at: float, state: RequestState) -> None:
        """The request reached `state` (final) at `at`; its state may go at `at + after_s`."""
        if request_id in self._released:
            return
        when = at + self.after_s
        known = self._due.get(request_id)
        if known is not None and known[0] <= when:
            self._due[request_id] = (known[0], state)
            return
        self._due[request_id] = (when, state)
        heapq.heappush(self._heap, (when, request_id))

    def past_hold(self, at: float, now: float) -> bool:
        """Whether a request that ended at `at` is past its hold at `now` (one read back on a restart)."""
        return at + self.after_s <= now

    def due(self, now: float) -> list[str]:
        """Ids whose hold has passed: they are remembered as released and no longer pending."""
        out: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            when, request_id = heapq.heappop(self._heap)
            entry = self._due.get(request_id)
            if entry is None or entry[0] != when:
                continue  # superseded by an earlier deadline
            del self._due[request_id]
            self.release(request_id, entry[1])
            out.append(request_id)
        return out

    def release(self, request_id: str, state: RequestState) -> None:
        """Remember the request as released now (its state is gone)."""
        self._due.pop(request_id, None)
        self._released[request_id] = state
        self._released.move_to_end(request_id)
        while len(self._released) > self._remembered:
            self._released.popitem(last=False)

    def released(self, request_id: str) -> RequestState | None:
        """The final state of a request whose state was released, if it is still remembered."""
        return self._released.get(request_id)

    def pending(self) -> int:
        return len(self._due)

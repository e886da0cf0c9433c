"""A fetch wait that is short while records flow, for a broker that answers a fetch only when its wait is over.

Apache Kafka answers a waiting fetch as soon as records arrive: `fetch_max_wait_ms` only bounds an
empty answer, and a long wait costs nothing. The embedded broker (Tansu) polls its storage while a
fetch waits, at half the remaining wait each time (after 12.5 ms, 18.75 ms, ... of a 25 ms wait),
so a record waits on the broker for the next of those polls: a few ms per hop at 25 ms. A shorter
wait shortens every hop, and every idle consumer then costs the broker (and itself) CPU in
proportion to its fetches per second.

Such a broker says so in its profile, `client_overrides["broker"]["busy_fetch_wait_ms"]`. A
service's consumer then fetches with that wait while records keep coming, and with its usual one
once none came for `QUIET_S`: the idle cost stays that of the usual wait, and the first record
after a quiet spell still waits as long as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer

from datacreator.bus.factory import client_overrides
from datacreator.config import Settings

log = logging.getLogger(__name__)

# Records closer together than this keep a consumer on the short wait.
QUIET_S = 1.0


def busy_fetch_wait_ms(settings: Settings) -> int | None:
    """The broker's fetch wait for records that flow, when its profile gives one."""
    value = client_overrides(settings, "broker").get("busy_fetch_wait_ms")
    return int(value) if value is not None else None


class AdaptiveFetchWait:
    """The fetch wait a consumer should use next, from whether its last polls returned records."""

    def __init__(self, idle_ms: int, busy_ms: int, quiet_s: float = QUIET_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_ms = idle_ms
        self.busy_ms = min(busy_ms, idle_ms)
        self.quiet_s = quiet_s
        self._clock = clock
        self._last_records = -float("inf")

    def observe(self, got_records: bool) -> int:
        now = self._clock()
        if got_records:
            self._last_records = now
        return self.busy_ms if now - self._last_records < self.quiet_s else self.idle_ms


class ConsumerFetchWait:
    """Applies an AdaptiveFetchWait to the fetcher of one started aiokafka consumer.

    aiokafka reads the wait from its fetcher each time it builds a fetch request, and offers no
    public way to change it on a running consumer: this is the one place that sets it.
    """

    def __init__(self, fetcher: Any, policy: AdaptiveFetchWait) -> None:
        self._fetcher = fetcher
        self.policy = policy

    @property
    def current_ms(self) -> int:
        """The wait the consumer's next fetch request will carry."""
        return int(self._fetcher._fetch_max_wait_ms)

    def observe(self, got_records: bool) -> None:
        self._fetcher._fetch_max_wait_ms = self.policy.observe(got_records)


def adaptive_fetch_wait(settings: Settings, consumer: AIOKafkaConsumer) -> ConsumerFetchWait | None:
    """The fetch wait of a started service consumer on a broker that asks for one (None: keep the
    configured one, also with an aiokafka whose fetcher has no such wait)."""
    busy = busy_fetch_wait_ms(settings)
    if busy is None:
        return None
    fetcher = getattr(consumer, "_fetcher", None)
    idle = getattr(fetcher, "_fetch_max_wait_ms", None)
    if not isinstance(idle, int):
        log.info("this aiokafka's consumer has no adjustable fetch wait; keeping the configured one")
        return None
    if busy >= idle:
        return None
    return ConsumerFetchWait(fetcher, AdaptiveFetchWait(idle, busy))

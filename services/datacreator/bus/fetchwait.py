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

from aiokafka import AIOKafkaConsumer

from datacreator.config import Settings

log = logging.getLogger(__name__)

# Records closer together than this keep a consumer on the short wait.
QUIET_S = 1.0


def busy_fetch_wait_ms(settings: Settings) -> int | None:
    """The broker's fetch wait for records that flow, when its profile gives one."""
    value = settings.kafka.client_overrides.get("broker", {}).get("busy_fetch_wait_ms")
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
    """Applies an AdaptiveFetchWait to one started aiokafka consumer.

    aiokafka reads the wait from its fetcher each time it builds a fetch request, and offers no
    public way to change it on a running consumer: this is the one place that sets it. When the
    fetcher has no such attribute (another aiokafka), the consumer keeps its configured wait.
    """

    def __init__(self, consumer: AIOKafkaConsumer, policy: AdaptiveFetchWait) -> None:
        self.consumer = consumer
        self.policy = policy
        self._applied: int | None = None

    @property
    def current_ms(self) -> int | None:
        """The wait the consumer's next fetch request will carry (None: not adjustable)."""
        fetcher = getattr(self.consumer, "_fetcher", None)
        value = getattr(fetcher, "_fetch_max_wait_ms", None)
        return value if isinstance(value, int) else None

    def observe(self, got_records: bool) -> None:
        wait = self.policy.observe(got_records)
        if wait == self._applied:
            return
        fetcher = getattr(self.consumer, "_fetcher", None)
        if fetcher is None or not isinstance(getattr(fetcher, "_fetch_max_wait_ms", None), int):
            if self._applied is None:
                log.info("this aiokafka's consumer has no adjustable fetch wait; keeping %d ms", self.policy.idle_ms)
            self._applied = wait  # said once
            return
        fetcher._fetch_max_wait_ms = wait
        self._applied = wait


def adaptive_fetch_wait(settings: Settings, consumer: AIOKafkaConsumer) -> ConsumerFetchWait | None:
    """The fetch wait of a service's consumer on a broker that asks for one (None: keep the configured one)."""
    busy = busy_fetch_wait_ms(settings)
    idle = getattr(consumer, "_fetch_max_wait_ms", None)  # set from the consumer's arguments
    if busy is None or not isinstance(idle, int) or busy >= idle:
        return None
    return ConsumerFetchWait(consumer, AdaptiveFetchWait(idle, busy))

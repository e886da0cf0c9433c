"""Services as OS processes (`datacreator serve NAME`), configured through the environment, to kill.

    proc = ServiceProcess("curator", service_env(settings), log_dir)
    proc.start(); await proc.wait_ready()
    proc.kill()               # SIGKILL: nothing runs after it
    await proc.terminate()    # SIGTERM, then the exit code and how long it took
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from datacreator.config import Settings
from datacreator.embedded.broker import die_with_parent, free_port

# Short group timings: a dead member's partitions move after ~2x the session timeout on Tansu.
TEST_SESSION_TIMEOUT_MS = 2000
TEST_HEARTBEAT_MS = 500


def service_env(settings: Settings, **extra: object) -> dict[str, str]:
    """The environment that makes `datacreator serve` use these settings' broker, topics and LLM."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATACREATOR_")}
    env.update({
        "DATACREATOR_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "DATACREATOR_KAFKA_CLIENT_OVERRIDES": json.dumps(settings.kafka.client_overrides),
        "DATACREATOR_TOPIC_PARTITIONS": str(settings.kafka.topic_partitions),
        "DATACREATOR_KAFKA_SESSION_TIMEOUT_MS": str(TEST_SESSION_TIMEOUT_MS),
        "DATACREATOR_KAFKA_HEARTBEAT_INTERVAL_MS": str(TEST_HEARTBEAT_MS),
        "DATACREATOR_SHUTDOWN_TIMEOUT_S": str(settings.runtime.shutdown_timeout_s),
        "DATACREATOR_STATUS_INTERVAL_S": str(settings.planner.status_interval_s),
        "DATACREATOR_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    })
    for field, name in settings.topics.model_dump().items():
        env[f"DATACREATOR_TOPICS__{field.upper()}"] = name
    if settings.endpoints_json:
        env["DATACREATOR_ENDPOINTS_JSON"] = settings.endpoints_json
    for key, value in extra.items():
        env[f"DATACREATOR_{key.upper()}"] = str(value)
    return env


class ServiceProcess:
    """One `datacreator serve NAME` process; restartable, with its log kept across restarts."""

    def __init__(self, service: str, env: dict[str, str], log_dir: Path, replica: int = 0) -> None:
        self.service = service
        self.replica = replica
        self.env = dict(env)
        self.log_path = log_dir / f"{service}-{replica}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0

    @property
    def label(self) -> str:
        return f"{self.service}-{self.replica}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> ServiceProcess:
        assert not self.alive, f"{self.label} is running already"
        self.port = free_port()
        env = {**self.env, "DATACREATOR_HTTP_PORT": str(self.port)}
        with open(self.log_path, "ab") as out:
            out.write(f"=== start {self.starts} ===\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "datacreator.cli", "--log-level", "INFO", "serve", self.service],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent,
            )
        self.starts += 1
        return self

    async def wait_ready(self, timeout_s: float = 40.0) -> None:
        """Until /readyz answers 200 (the consumer has its partitions)."""
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=1.0) as http:
            while time.monotonic() < deadline:
                if not self.alive:
                    raise RuntimeError(f"{self.label} exited with {self.proc.returncode if self.proc else None}:\n{self.log_tail()}")
                try:
                    if (await http.get(f"http://127.0.0.1:{self.port}/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.label} not ready within {timeout_s} s:\n{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive:
            assert self.proc is not None
            os.killpg(self.proc.pid, sig)

    async def wait_exit(self, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.proc.poll() if self.proc else None

    async def terminate(self, timeout_s: float) -> tuple[int | None, float]:
        """SIGTERM; the exit code (None: still running after `timeout_s`) and the seconds it took."""
        started = time.monotonic()
        self.kill(signal.SIGTERM)
        code = await self.wait_exit(timeout_s)
        return code, time.monotonic() - started

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a few seconds: for teardown."""
        if not self.alive:
            return
        code, _ = await self.terminate(8.0)
        if code is None:
            self.kill(signal.SIGKILL)
            await self.wait_exit(5.0)

    async def metrics(self) -> str:
        async with httpx.AsyncClient(timeout=2.0) as http:
            return (await http.get(f"http://127.0.0.1:{self.port}/metrics")).text

    async def assigned(self, topic: str) -> set[int]:
        """Partitions of `topic` this process holds now, from its consumer-lag gauge."""
        held = set()
        for labels in re.findall(r"^datacreator_consumer_lag_messages\{([^}]*)\}", await self.metrics(), re.M):
            found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if found.get("topic") == topic:
                held.add(int(found["partition"]))
        return held

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, limit: int = 3000) -> str:
        return self.log_text()[-limit:]


class Fleet:
    """Every process a test started; `stop_all` in a finally block leaves none behind."""

    def __init__(self, settings: Settings, log_dir: Path, **extra_env: object) -> None:
        self.env = service_env(settings, **extra_env)
        self.log_dir = log_dir
        self.procs: list[ServiceProcess] = []

    def add(self, service: str, replicas: int = 1, **extra_env: object) -> list[ServiceProcess]:
        env = {**self.env, **{f"DATACREATOR_{k.upper()}": str(v) for k, v in extra_env.items()}}
        offset = sum(1 for p in self.procs if p.service == service)
        added = [ServiceProcess(service, env, self.log_dir, offset + i) for i in range(replicas)]
        self.procs += added
        return added

    def by_service(self, service: str) -> list[ServiceProcess]:
        return [p for p in self.procs if p.service == service]

    async def start_all(self, timeout_s: float = 45.0) -> None:
        for proc in self.procs:
            proc.start()
        await asyncio.gather(*(p.wait_ready(timeout_s) for p in self.procs))

    async def stop_all(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.procs), return_exceptions=True)

    def logs(self) -> str:
        return "\n".join(f"--- {p.label} ---\n{p.log_tail(1500)}" for p in self.procs)


def record_faults(test: str, fault: str, injected: int, outcome: dict[str, object]) -> None:
    """Print what a test injected and saw; appended as JSON to $DATACREATOR_RELIABILITY_REPORT when set."""
    entry = {"test": test, "fault": fault, "injected": injected, **outcome}
    print("reliability:", json.dumps(entry, sort_keys=True))
    path = os.environ.get("DATACREATOR_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps(entry, sort_keys=True) + "\n")

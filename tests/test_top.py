"""`datacreator top` against a running stack: live under tmux (a real terminal), and `--once`."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from rich.console import Console

from datacreator import remote
from datacreator.contracts import CreationRequest, RequestState, RequestStatus, Strategy
from datacreator.serve import ServiceGroup
from datacreator.stack import LLMTarget, endpoint_json
from datacreator.top import MetricsSnapshot, Overview, metrics_url, render

TMUX = shutil.which("tmux")
TARGET = 12

METRICS_BEFORE = """\
# TYPE datacreator_examples_accepted_total counter
datacreator_examples_accepted_total 10.0
# TYPE datacreator_llm_calls_total counter
datacreator_llm_calls_total{endpoint="default",outcome="ok"} 7.0
datacreator_llm_calls_total{endpoint="default",outcome="429"} 2.0
# TYPE datacreator_consumer_lag_messages gauge
datacreator_consumer_lag_messages{service="curator",topic="c",partition="0"} 3.0
datacreator_consumer_lag_messages{service="curator",topic="c",partition="1"} 4.0
"""
METRICS_AFTER = METRICS_BEFORE.replace("accepted_total 10.0", "accepted_total 30.0")


def top_env(settings, columns: int = 200) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATACREATOR_")}
    env.update(DATACREATOR_KAFKA_BOOTSTRAP=settings.kafka.bootstrap, DATACREATOR_KAFKA_SECURITY_PROTOCOL="PLAINTEXT",
               COLUMNS=str(columns), LINES="50", TERM="xterm-256color")
    for field, topic in settings.topics.model_dump().items():
        env[f"DATACREATOR_TOPICS__{field.upper()}"] = topic
    return env


def test_overview_from_two_snapshots():
    before = MetricsSnapshot.parse(METRICS_BEFORE, instance="a")
    after = MetricsSnapshot.parse(METRICS_AFTER, instance="a")
    before.taken_at, after.taken_at = 100.0, 104.0
    view = Overview.of(after, before)
    assert view.examples_per_s == pytest.approx(5.0)
    assert view.accepted == 30 and view.llm_calls == {"ok": 7, "429": 2}
    assert view.lag == {"curator": 7}
    assert Overview.of(after).examples_per_s is None
    assert metrics_url("127.0.0.1:9000") == "http://127.0.0.1:9000/metrics"
    assert metrics_url("http://h:1/custom") == "http://h:1/custom"

    status = RequestStatus(request_id="req-7", state=RequestState.RUNNING, target_count=40, accepted=10, llm_calls=3)
    console = Console(width=160, record=True)
    console.print(render([status], view))
    screen = console.export_text()
    for shown in ("req-7", "RUNNING", "10/40", "examples/s", "5.00", "429s", "lag"):
        assert shown in screen, shown


async def _stack(bus_settings, simulator):
    settings = bus_settings.with_updates(endpoints_json=endpoint_json(LLMTarget(simulator.base_url, "datacreator-simulator")))
    return settings, await ServiceGroup(settings).start()


def _tmux(socket: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TMUX, "-L", socket, "-f", "/dev/null", *args], capture_output=True, text=True, timeout=10, env=env)


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
async def test_top_shows_the_request_live_and_once(bus_settings, simulator):
    simulator.configure(latency_s=0.4)  # six calls in one chain: seconds to watch it run
    settings, group = await _stack(bus_settings, simulator)
    socket = f"dctop-{uuid.uuid4().hex[:8]}"
    url = f"{group.health.url}/metrics"
    env = top_env(settings)
    try:
        command = f"{sys.executable} -m datacreator.cli top --metrics {url} --interval 0.5"
        started = _tmux(socket, "new-session", "-d", "-s", "top", "-x", "200", "-y", "50", command, env=env)
        assert started.returncode == 0, started.stderr

        request = CreationRequest(
            instruction="Create commonsense multiple-choice questions with options A to D.",
            formatting_example={"question": "Where do you keep frozen peas?", "options": {"A": "freezer", "B": "shelf"}, "answer": "A"},
            target_count=TARGET, examples_per_call=2, strategy=Strategy.random, chains=1,
        )

        async def screen_until(*wanted: str, timeout_s: float = 40) -> str:
            deadline = time.monotonic() + timeout_s
            screen = ""
            while time.monotonic() < deadline:
                captured = _tmux(socket, "capture-pane", "-p", "-t", "top")
                screen = captured.stdout
                if all(w in screen for w in wanted):
                    return screen
                await asyncio.sleep(0.3)  # the services and their /metrics run on this loop
            raise AssertionError(f"top never showed {wanted}; last screen:\n{screen}")

        await screen_until("(no requests yet)", "llm calls")  # up and reading the bus before the request
        await remote.submit(settings, request)
        screen = await screen_until(request.request_id, "RUNNING")
        assert f"/{TARGET}" in screen
        screen = await screen_until(request.request_id, "COMPLETED", f"{TARGET}/{TARGET}", "ok ")
        row = next(line for line in screen.splitlines() if request.request_id in line)
        assert "COMPLETED" in row and f"{TARGET}/{TARGET}" in row and "#" * 20 in row
        for label in ("examples/s", "rejected", "llm calls", "429s", "cost", "lag"):
            assert label in screen, label
        assert "unreachable" not in screen

        _tmux(socket, "send-keys", "-t", "top", "q")
        deadline = time.monotonic() + 10
        while _tmux(socket, "has-session", "-t", "top").returncode == 0:
            assert time.monotonic() < deadline, "top did not exit on q"
            await asyncio.sleep(0.1)

        # --once: one frame on stdout, then exit; an endpoint that is down is reported, not fatal.
        once = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "datacreator.cli", "top", "--once", "--metrics", url, "--metrics", "127.0.0.1:9",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(once.communicate(), 30)
        assert once.returncode == 0, err.decode()
        text = out.decode()
        row = next(line for line in text.splitlines() if request.request_id in line)
        assert "COMPLETED" in row and f"{TARGET}/{TARGET}" in row
        assert "unreachable" in text and "127.0.0.1:9/metrics" in text
        assert "\x1b[?1049h" not in text, "--once does not take over the screen"
    finally:
        _tmux(socket, "kill-server")
        await group.stop()

"""A real Prometheus scrapes a running stack (planner, generator, curator as separate processes)
and its query API answers with what the request did."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from datacreator import remote
from datacreator.contracts import CreationRequest, RequestState, Strategy
from datacreator.embedded.broker import EmbeddedBroker
from datacreator.serve import CORE_SERVICES
from datacreator.stack import LLMTarget, endpoint_json

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
TARGET = 12

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.exists(PROMETHEUS) and os.path.exists(PROMTOOL)), reason="prometheus is not installed"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(settings, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATACREATOR_")}
    env.update(
        DATACREATOR_KAFKA_BOOTSTRAP=settings.kafka.bootstrap,
        DATACREATOR_KAFKA_SECURITY_PROTOCOL="PLAINTEXT",
        DATACREATOR_KAFKA_CLIENT_OVERRIDES=json.dumps(EmbeddedBroker.client_overrides()),
        DATACREATOR_TOPIC_PARTITIONS=str(settings.kafka.topic_partitions),
        DATACREATOR_ENDPOINTS_JSON=settings.endpoints_json,
        DATACREATOR_HTTP_PORT=str(port),
    )
    for field, topic in settings.topics.model_dump().items():
        env[f"DATACREATOR_TOPICS__{field.upper()}"] = topic
    return env


def prometheus_config(targets: dict[str, str], rules: Path | None) -> str:
    lines = ["global:", "  scrape_interval: 1s", "  scrape_timeout: 1s", "  evaluation_interval: 1s"]
    if rules is not None:
        lines += ["rule_files:", f"  - {rules}"]
    lines.append("scrape_configs:")
    for job, target in targets.items():
        lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: ['{target}']"]
    return "\n".join(lines) + "\n"


def stop(process: subprocess.Popen, timeout_s: float = 10) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s}s")
        await asyncio.sleep(0.2)


async def query(http: httpx.AsyncClient, base: str, expr: str) -> list[dict]:
    response = await http.get(f"{base}/api/v1/query", params={"query": expr})
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.timeout(90)
async def test_prometheus_scrapes_the_stack_and_answers_queries(bus_settings, simulator, tmp_path):
    settings = bus_settings.with_updates(endpoints_json=endpoint_json(LLMTarget(simulator.base_url, "datacreator-simulator")))
    ports = {name: free_port() for name in CORE_SERVICES}
    processes: list[subprocess.Popen] = []
    try:
        for name, port in ports.items():
            log = open(tmp_path / f"{name}.log", "wb")
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "datacreator.cli", "serve", name], env=service_env(settings, port),
                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
            ))
            log.close()
        targets = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        config = tmp_path / "prometheus.yml"
        config.write_text(prometheus_config(targets, RULES if RULES.exists() else None))
        prom_port = free_port()
        prom_log = open(tmp_path / "prometheus.log", "wb")
        processes.append(subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=prom_log, stderr=subprocess.STDOUT, cwd=tmp_path,
        ))
        prom_log.close()
        prom = f"http://127.0.0.1:{prom_port}"

        async with httpx.AsyncClient(timeout=3) as http:

            async def ready(url: str) -> bool:
                for process in processes:
                    assert process.poll() is None, f"{process.args} exited: see {tmp_path}"
                try:
                    return (await http.get(url)).status_code == 200
                except httpx.HTTPError:
                    return False

            for name, target in targets.items():
                await wait_for(lambda t=target: ready(f"http://{t}/readyz"), 40, f"{name} not ready")
            await wait_for(lambda: ready(f"{prom}/-/ready"), 20, "prometheus not ready")

            # Every endpoint serves lint-clean metrics.
            for name, target in targets.items():
                text = (await http.get(f"http://{target}/metrics")).text
                checked = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=20)
                assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), f"{name}: {checked.stderr}"

            request = CreationRequest(
                instruction="Create commonsense multiple-choice questions with options A to D.",
                formatting_example={"question": "Where do you keep frozen peas?", "options": {"A": "freezer", "B": "shelf"}, "answer": "A"},
                target_count=TARGET, examples_per_call=4, strategy=Strategy.random, chains=2,
            )
            await remote.submit(settings, request)
            final = await remote.wait_for_final(settings, request.request_id, timeout_s=40)
            assert final.state == RequestState.COMPLETED, final.error

            # Each service process counts from zero, so the scraped value is the request's own. Every
            # process exports the label-less counters; only the curator's moves.
            async def accepted() -> dict[str, float]:
                result = await query(http, prom, "datacreator_examples_accepted_total")
                by_job = {s["metric"]["job"]: float(s["value"][1]) for s in result}
                return by_job if by_job.get("curator") == TARGET else {}

            by_job = await wait_for(accepted, 15, "no scrape with the accepted examples")
            assert by_job == {"curator": TARGET, "generator": 0, "planner": 0}
            curator = await query(http, prom, 'datacreator_examples_accepted_total{job="curator"}')
            assert curator[0]["metric"]["instance"] == targets["curator"]
            total = await query(http, prom, "sum(datacreator_examples_accepted_total)")
            assert float(total[0]["value"][1]) == TARGET

            # The generator is scraped at its own moments, and a call still under way when the
            # request completed may end later: wait for a scrape that has every answer in it.
            async def ok_calls() -> float | None:
                result = await query(http, prom, 'sum(datacreator_llm_calls_total{outcome="ok"})')
                value = float(result[0]["value"][1]) if result else None
                return value if value == simulator.stats.status(200) else None

            assert await wait_for(ok_calls, 10, "no scrape with every LLM call") >= final.llm_calls - final.failed_calls > 0

            up = await query(http, prom, "up")
            assert {s["metric"]["job"]: s["value"][1] for s in up} == {name: "1" for name in CORE_SERVICES}

            if RULES.exists():
                rules = (await http.get(f"{prom}/api/v1/rules")).json()["data"]["groups"]
                assert rules, "the rules file was loaded"
                assert all(r.get("health") != "err" for g in rules for r in g["rules"]), rules
    finally:
        for process in reversed(processes):
            stop(process)
    assert [p.returncode for p in processes] == [0] * len(processes), "every process stops cleanly on SIGTERM"

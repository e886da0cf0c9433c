"""The CLI as a person meets it: bad input ends in one short message on stderr and exit code 2."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.helpers import MCQ, MCQ_INSTRUCTION

SERVICES = str(Path(__file__).resolve().parents[1] / "services")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def datacreator(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": SERVICES, **(env or {})}
    return subprocess.run([sys.executable, "-m", "datacreator.cli", *argv], capture_output=True, text=True,
                          env=environment, timeout=timeout)


def assert_short_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Unclosed" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 4, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def _write(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def test_run_on_a_missing_file(tmp_path):
    missing = str(tmp_path / "nope.json")
    assert_short_error(datacreator("run", missing, "--llm", "simulator"), missing, "no such file")


def test_run_on_invalid_json(tmp_path):
    path = _write(tmp_path, "bad.json", b'{"instruction": "x",')
    assert_short_error(datacreator("run", path, "--llm", "simulator"), path, "not valid JSON")


def test_run_on_a_request_without_formatting_example(tmp_path):
    path = _write(tmp_path, "r.json", orjson.dumps({"instruction": MCQ_INSTRUCTION, "target_count": 3}))
    assert_short_error(datacreator("run", path, "--llm", "simulator"), "formatting_example: Field required")


def test_run_with_a_negative_target_count(tmp_path):
    path = _write(tmp_path, "r.json", orjson.dumps({"instruction": MCQ_INSTRUCTION, "formatting_example": MCQ, "target_count": -3}))
    result = datacreator("run", path, "--llm", "simulator")
    assert_short_error(result, "target_count: Input should be greater than or equal to 1")
    assert "formatting_example" not in result.stderr  # one line per error, only the fields that are wrong


def test_each_validation_error_is_one_line_naming_its_field(tmp_path):
    path = _write(tmp_path, "r.json", orjson.dumps({"instruction": "", "formatting_example": MCQ, "target_count": 0,
                                                   "model": {"temperature": 9}}))
    result = datacreator("run", path, "--llm", "simulator")
    assert_short_error(result, "instruction:", "target_count:", "model.temperature:")


def test_status_without_a_broker_names_the_address_and_a_hint():
    bootstrap = f"127.0.0.1:{_free_port()}"
    result = datacreator("status", "some-request", env={"DATACREATOR_KAFKA_BOOTSTRAP": bootstrap})
    assert_short_error(result, bootstrap, "DATACREATOR_KAFKA_BOOTSTRAP")


def test_debug_log_level_still_shows_the_traceback(tmp_path):
    path = _write(tmp_path, "bad.json", b"{")
    result = datacreator("--log-level", "DEBUG", "run", path, "--llm", "simulator")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "JSONDecodeError" in result.stderr


@pytest.mark.parametrize("command", ["status", "report", "cancel", "export"])
async def test_an_unknown_request_id(broker, command, tmp_path):
    extra = ["--out", str(tmp_path / "out.jsonl")] if command == "export" else []
    result = await asyncio.to_thread(datacreator, command, "no-such-request", *extra,
                                     env={"DATACREATOR_KAFKA_BOOTSTRAP": broker.bootstrap})
    assert_short_error(result, "no-such-request")
    assert list(tmp_path.iterdir()) == []  # nothing exported


async def test_cancel_of_a_request_no_planner_has_taken_yet_is_sent(bus_settings, tmp_path):
    """A request that is on the requests topic but has no status yet is known: its cancel goes out."""
    from datacreator import remote
    from datacreator.contracts import CancelRequest, CreationRequest
    from datacreator.export import find_request

    request = CreationRequest(request_id="queued-1", instruction=MCQ_INSTRUCTION, formatting_example=MCQ, target_count=3)
    await remote.submit(bus_settings, request)
    env = {"DATACREATOR_KAFKA_BOOTSTRAP": bus_settings.kafka.bootstrap,
           **{f"DATACREATOR_TOPICS__{name.upper()}": topic for name, topic in bus_settings.topics.model_dump().items()}}
    result = await asyncio.to_thread(datacreator, "cancel", "queued-1", env=env)
    assert result.returncode == 0, result.stderr
    assert "cancel sent for queued-1" in result.stdout
    cancels = [m async for m in remote.read_messages(bus_settings, bus_settings.topics.requests, CancelRequest)]
    assert [c.request_id for c in cancels] == ["queued-1"]
    assert await find_request(bus_settings, "queued-1") is not None


def _mcq_request(tmp_path: Path, **extra) -> str:
    return _write(tmp_path, "mcq.json", orjson.dumps({"request_id": "priced", "instruction": MCQ_INSTRUCTION,
                                                      "formatting_example": MCQ, "target_count": 10, **extra}))


def _cost(stdout: str) -> float:
    line = next(row for row in stdout.splitlines() if row.startswith("cost"))
    return float(line.split("$")[1].split()[0])


def test_run_prices_its_endpoint_from_the_flags(tmp_path):
    path = _mcq_request(tmp_path)
    result = datacreator("run", path, "--llm", "simulator", "--price-in", "1000", "--price-out", "2000",
                         "--out", str(tmp_path / "out.jsonl"), "--quiet", timeout=180)
    assert result.returncode == 0, result.stderr
    assert _cost(result.stdout) > 0


def test_run_honours_the_endpoints_json_and_warns_when_a_budget_meets_no_prices(tmp_path):
    # Large enough for one call's worst case (6 attempts of prompt + max_tokens at $1000 per million).
    path = _mcq_request(tmp_path, budget={"max_cost_usd": 100})
    unpriced = datacreator("run", path, "--llm", "simulator", "--out", str(tmp_path / "a.jsonl"), "--quiet", timeout=180)
    assert unpriced.returncode == 0, unpriced.stderr
    assert unpriced.stderr.count("has no prices") == 1 and _cost(unpriced.stdout) == 0
    priced = datacreator("run", path, "--llm", "simulator", "--out", str(tmp_path / "b.jsonl"), "--quiet", timeout=180,
                         env={"DATACREATOR_ENDPOINTS_JSON": '{"default": {"input_price_per_1m": 1000, "output_price_per_1m": 1000}}'})
    assert "has no prices" not in priced.stderr
    assert _cost(priced.stdout) > 0

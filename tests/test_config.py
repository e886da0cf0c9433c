"""Settings: one section per reader, with the flat environment names of before still working."""

from __future__ import annotations

import pytest

from datacreator.config import FLAT_NAMES, Settings

PASSWORD = "s3cret-for-the-config-test"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """No DATACREATOR_ variable of the machine leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("DATACREATOR_"):
            monkeypatch.delenv(name)


def test_nested_environment_names_set_their_section(monkeypatch):
    monkeypatch.setenv("DATACREATOR_KAFKA__BOOTSTRAP", "kafka-1:9092")
    monkeypatch.setenv("DATACREATOR_PLANNER__STALL_CALLS", "7")
    monkeypatch.setenv("DATACREATOR_SINK__FSYNC", "0")
    monkeypatch.setenv("DATACREATOR_RUNTIME__MESSAGE_ATTEMPTS", "5")
    settings = Settings()
    assert settings.kafka.bootstrap == "kafka-1:9092"
    assert settings.planner.stall_calls == 7
    assert settings.sink.fsync is False
    assert settings.runtime.message_attempts == 5


def test_flat_environment_names_still_work(monkeypatch):
    monkeypatch.setenv("DATACREATOR_KAFKA_BOOTSTRAP", "kafka-2:9092")
    monkeypatch.setenv("DATACREATOR_KAFKA_CLIENT_OVERRIDES", '{"producer": {"linger_ms": 0}}')
    monkeypatch.setenv("DATACREATOR_TOPIC_PARTITIONS", "3")
    monkeypatch.setenv("DATACREATOR_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("DATACREATOR_GENERATOR_REPLICAS", "2")
    monkeypatch.setenv("DATACREATOR_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("DATACREATOR_SINK_DIR", "/data/examples")
    monkeypatch.setenv("DATACREATOR_MAX_FIELD_CHARS", "99")
    settings = Settings()
    assert settings.kafka.bootstrap == "kafka-2:9092"
    assert settings.kafka.client_overrides == {"producer": {"linger_ms": 0}}
    assert settings.kafka.topic_partitions == 3
    assert settings.runtime.message_attempts == 4
    assert (settings.generator.replicas, settings.generator.redis_url) == (2, "redis://127.0.0.1:6379/0")
    assert settings.sink.dir == "/data/examples"
    assert settings.curator.max_field_chars == 99


def test_the_nested_name_wins_over_the_flat_one(monkeypatch):
    monkeypatch.setenv("DATACREATOR_KAFKA_BOOTSTRAP", "flat:9092")
    monkeypatch.setenv("DATACREATOR_KAFKA__BOOTSTRAP", "nested:9092")
    monkeypatch.setenv("DATACREATOR_KAFKA_CLIENT_ID", "from-the-flat-name")  # other fields of the section still merge
    settings = Settings()
    assert settings.kafka.bootstrap == "nested:9092"
    assert settings.kafka.client_id == "from-the-flat-name"


def test_keyword_arguments_take_both_spellings_and_beat_the_environment(monkeypatch):
    monkeypatch.setenv("DATACREATOR_KAFKA__BOOTSTRAP", "from-env:9092")
    monkeypatch.setenv("DATACREATOR_KAFKA_SESSION_TIMEOUT_MS", "3000")
    assert Settings(kafka_bootstrap="flat-kwarg:9092").kafka.bootstrap == "flat-kwarg:9092"
    settings = Settings(kafka={"bootstrap": "nested-kwarg:9092"}, kafka_bootstrap="flat-kwarg:9092")
    assert settings.kafka.bootstrap == "nested-kwarg:9092"
    assert settings.kafka.session_timeout_ms == 3000  # the environment fills what the arguments leave out


def test_every_flat_name_lands_on_a_real_field():
    for flat, (section, name) in FLAT_NAMES.items():
        assert name in type(getattr(Settings(), section)).model_fields, flat


def test_with_updates_changes_only_the_fields_named():
    base = Settings(kafka_bootstrap="b:9092", stall_calls=9)
    changed = base.with_updates(kafka_session_timeout_ms=3000, planner={"status_interval_s": 0.1})
    assert (changed.kafka.bootstrap, changed.kafka.session_timeout_ms) == ("b:9092", 3000)
    assert (changed.planner.stall_calls, changed.planner.status_interval_s) == (9, 0.1)
    assert (base.kafka.session_timeout_ms, base.planner.status_interval_s) == (10_000, 0.5)  # the original is unchanged
    with pytest.raises(TypeError, match="kafka_bootsrap"):
        base.with_updates(kafka_bootsrap="typo:9092")
    with pytest.raises(TypeError, match="planner.stall"):
        base.with_updates(planner={"stall": 1})


def test_with_updates_recomputes_the_endpoints():
    base = Settings(endpoints_json='{"a": {"base_url": "http://a/v1"}}')
    assert set(base.endpoints) == {"a"}
    assert set(base.with_updates(endpoints_json='{"b": {"base_url": "http://b/v1"}}').endpoints) == {"b"}


@pytest.mark.parametrize("name", ["DATACREATOR_KAFKA_SASL_PASSWORD", "DATACREATOR_KAFKA__SASL_PASSWORD"])
def test_the_password_stays_secret_under_either_name(monkeypatch, name):
    monkeypatch.setenv(name, PASSWORD)
    settings = Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN", kafka_sasl_username="u")
    assert settings.kafka_kwargs()["sasl_plain_password"] == PASSWORD
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.model_dump()), repr(settings.kafka)):
        assert PASSWORD not in text


def test_the_password_file_works_in_the_section(monkeypatch, tmp_path):
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    monkeypatch.setenv("DATACREATOR_KAFKA__SASL_PASSWORD_FILE", str(secret))
    settings = Settings(kafka={"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"})
    assert settings.kafka_kwargs()["sasl_plain_password"] == PASSWORD

"""Configuration, from the environment (prefix DATACREATOR_) or a .env file.

Secrets are SecretStr and may come from files (`*_FILE` variables), so they are never printed
by a repr, a log line or an exception.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _secret_from(value: SecretStr | None, file_path: str | None, env_name: str | None = None) -> SecretStr | None:
    if value is not None and value.get_secret_value():
        return value
    if file_path:
        return SecretStr(Path(file_path).read_text().strip())
    if env_name and os.environ.get(env_name):
        return SecretStr(os.environ[env_name])
    return None


class TopicNames(BaseModel):
    requests: str = "datacreator.requests"
    tasks: str = "datacreator.tasks"
    candidates: str = "datacreator.candidates"
    examples: str = "datacreator.examples"
    rejected: str = "datacreator.rejected"
    outcomes: str = "datacreator.outcomes"
    status: str = "datacreator.status"
    dlq: str = "datacreator.dlq"
    planner_state: str = "datacreator.planner-state"

    def all(self) -> list[str]:
        return list(self.model_dump().values())

    def compacted(self) -> set[str]:
        return {self.status, self.planner_state}


class EndpointConfig(BaseModel):
    """One OpenAI-compatible endpoint, by alias."""

    base_url: str = Field(..., description="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    model: str = "default"
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the key.")
    api_key_file: str | None = None
    rpm: int | None = Field(None, gt=0, description="Requests per minute allowed by the provider.")
    tpm: int | None = Field(None, gt=0, description="Tokens per minute allowed by the provider.")
    max_concurrency: int = Field(32, ge=1)
    input_price_per_1m: float = Field(0.0, ge=0)
    output_price_per_1m: float = Field(0.0, ge=0)
    structured_output: Literal["json_schema", "json_object", "none"] = "json_schema"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0
    total_timeout_s: float = 300.0
    max_attempts: int = Field(6, ge=1)
    http2: bool = False
    tpm_counts: Literal["max_tokens", "usage"] = Field(
        "max_tokens", description="What a call costs against TPM: prompt + max_tokens (as most providers count) or the usage returned."
    )
    tokenizer: str | None = Field(
        None, description='The endpoint\'s tokenizer for TPM reservations: "gguf:/path/model.gguf" or "embedded:<model>" '
        "(set for the embedded LLM); without one, a per-script estimate. Calls settle with the reported usage either way.",
    )

    def key(self) -> SecretStr | None:
        return _secret_from(self.api_key, self.api_key_file, self.api_key_env)

    def __repr__(self) -> str:  # the key stays out of reprs even when set inline
        return f"EndpointConfig(base_url={self.base_url!r}, model={self.model!r})"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DATACREATOR_", env_nested_delimiter="__", extra="ignore")

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: str | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_client_id: str = "datacreator"
    kafka_client_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='Client settings a broker needs, {"producer": {...}, "consumer": {...}}, applied over the '
        "defaults of every aiokafka client (the embedded broker gives its own: EmbeddedBroker.client_overrides()).",
    )
    kafka_session_timeout_ms: int = Field(10_000, ge=1000, description="Consumer group session timeout: how soon a dead member's partitions move.")
    kafka_heartbeat_interval_ms: int = Field(2_000, ge=100)
    topics: TopicNames = Field(default_factory=TopicNames)
    topic_partitions: int = Field(6, ge=1)
    topic_replication_factor: int = Field(1, ge=1)
    max_message_bytes: int = Field(1_000_000, ge=1024)

    # Shared state
    redis_url: str | None = Field(None, description="redis://127.0.0.1:6379/0 for a rate limit shared by all generator replicas.")

    # LLM endpoints: a JSON object {alias: EndpointConfig}, inline or in a file.
    endpoints_json: str | None = None
    endpoints_file: str | None = None

    # Service runtime
    http_host: str = "127.0.0.1"
    http_port: int = Field(0, ge=0, description="Port of /healthz, /readyz and /metrics; 0 picks a free one.")
    max_in_flight: int = Field(64, ge=1)
    max_attempts: int = Field(3, ge=1, description="Attempts at processing one message before it goes to the DLQ.")
    shutdown_timeout_s: float = 20.0
    log_level: str = "INFO"
    final_state_ttl_s: float = Field(
        600.0, ge=0, description="How long a service keeps a request's state (plan, latest status, dedup and written-id "
        "sets) after its final status, for late messages; the ids of released requests are still remembered as closed.",
    )

    # Generator
    generator_replicas: int = Field(
        1, ge=1, description="Generator replicas expected to share the limit, until Redis reports the live count: while Redis is unreachable each keeps 1/N of it."
    )

    ratelimit_window_s: float = Field(60.0, gt=0, description="Window of the RPM/TPM limits (providers use 60 s; tests use shorter).")

    # Planner
    status_interval_s: float = Field(0.5, gt=0, description="Least time between two status messages of one request.")
    stall_calls: int = Field(30, ge=1, description="Calls in a row with no new accepted example before a request FAILS as stalled.")
    max_active_requests: int = Field(100, ge=1)
    snapshot_retention_s: float = Field(
        3600.0, ge=0, description="How long a finished request's planner snapshot is kept before a tombstone deletes it (late outcomes still count until then).",
    )
    # Operator caps on one request, enforced when it is validated (REJECTED with the cap named).
    max_target_count: int | None = Field(None, ge=1, description="Most examples one request may ask for.")
    max_tokens_per_call: int | None = Field(None, ge=16, description="Largest model.max_tokens a request may ask for.")
    max_cost_per_request: float | None = Field(None, gt=0, description="Largest budget.max_cost_usd; also the budget of a request without one when no default is set.")
    default_max_cost_usd: float | None = Field(None, gt=0, description="Budget of a request that names none.")

    # Curator
    max_field_chars: int = Field(5_000, ge=1)
    raw_text_limit: int = Field(2_000, ge=100, description="Characters of raw model output kept on a rejection.")
    minhash_num_perm: int = Field(64, ge=16)

    # Sink
    sink_dir: str = Field("./sink", description="Where `serve sink` writes its JSONL shards, one folder per request.")
    sink_shard_rows: int = Field(10_000, ge=1)
    sink_fsync: bool = Field(True, description="fsync each row before its offset is committed (restart-safe).")

    # Embeddings
    embedding_device: str = "cpu"

    @model_validator(mode="after")
    def _check_sasl(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_mechanism:
            raise ValueError("DATACREATOR_KAFKA_SASL_MECHANISM is required with a SASL security protocol")
        return self

    @cached_property
    def endpoints(self) -> dict[str, EndpointConfig]:
        raw: dict[str, Any] = {}
        if self.endpoints_file:
            raw.update(json.loads(Path(self.endpoints_file).read_text()))
        if self.endpoints_json:
            raw.update(json.loads(self.endpoints_json))
        return {alias: EndpointConfig.model_validate(cfg) for alias, cfg in raw.items()}

    def operator_caps(self) -> Any:
        """The caps and endpoint prices the planner budgets with (a `logic.budget.OperatorCaps`)."""
        from datacreator.logic.budget import EndpointPrice, OperatorCaps

        prices = {
            alias: EndpointPrice(input_per_1m=cfg.input_price_per_1m, output_per_1m=cfg.output_price_per_1m,
                                 max_attempts=cfg.max_attempts)
            for alias, cfg in self.endpoints.items()
        }
        return OperatorCaps(max_tokens_per_call=self.max_tokens_per_call, max_cost_per_request=self.max_cost_per_request,
                            default_max_cost_usd=self.default_max_cost_usd, prices=prices)

    def with_updates(self, **changes: Any) -> Settings:
        """A copy with some fields changed (derived values such as `endpoints` are recomputed)."""
        copy = self.model_copy(update=changes)
        copy.__dict__.pop("endpoints", None)
        return copy

    def kafka_kwargs(self) -> dict[str, Any]:
        """Connection settings shared by every aiokafka client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap,
            "security_protocol": self.kafka_security_protocol,
            "client_id": self.kafka_client_id,
        }
        if self.kafka_security_protocol.endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=self.kafka_ssl_cafile, certfile=self.kafka_ssl_certfile, keyfile=self.kafka_ssl_keyfile
            )
        if self.kafka_security_protocol.startswith("SASL"):
            password = _secret_from(self.kafka_sasl_password, self.kafka_sasl_password_file)
            kwargs["sasl_mechanism"] = self.kafka_sasl_mechanism
            kwargs["sasl_plain_username"] = self.kafka_sasl_username
            kwargs["sasl_plain_password"] = password.get_secret_value() if password else None
        return kwargs

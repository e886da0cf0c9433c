"""Configuration, from the environment (prefix DATACREATOR_).

Secrets are SecretStr and may come from files (`*_FILE` variables), so they are never printed
by a repr, a log line or an exception.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_origin

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


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
    base_urls: list[str] = Field(
        default_factory=list,
        description="Further servers of the same model (e.g. several llama.cpp or vLLM processes): each call goes to "
        "the one with the fewest calls in flight; rpm, tpm and max_concurrency cover them all.",
    )
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

    @property
    def servers(self) -> list[str]:
        """Every base URL, `base_url` first, each once."""
        return list(dict.fromkeys([self.base_url, *self.base_urls]))


class KafkaSettings(BaseModel):
    """How every service reaches the bus, and the topics it creates when missing."""

    bootstrap: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    client_id: str = "datacreator"
    client_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='Client settings a broker needs, {"producer": {...}, "consumer": {...}}, applied over the '
        "defaults of every aiokafka client, and what the bus must know of the broker, {\"broker\": "
        "{\"short_list_offsets\": true, \"busy_fetch_wait_ms\": 8}} (the embedded broker gives its own: "
        "EmbeddedBroker.client_overrides()).",
    )
    session_timeout_ms: int = Field(10_000, ge=1000, description="Consumer group session timeout: how soon a dead member's partitions move.")
    heartbeat_interval_ms: int = Field(2_000, ge=100)
    topic_partitions: int = Field(6, ge=1)
    topic_replication_factor: int = Field(1, ge=1)
    max_message_bytes: int = Field(1_000_000, ge=1024)

    @model_validator(mode="after")
    def _check_sasl(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ValueError("DATACREATOR_KAFKA_SASL_MECHANISM is required with a SASL security protocol")
        return self


class RuntimeSettings(BaseModel):
    """What the service runner and its health server do, the same for every service."""

    http_host: str = "127.0.0.1"
    http_port: int = Field(0, ge=0, description="Port of /healthz, /readyz and /metrics; 0 picks a free one.")
    max_in_flight: int = Field(64, ge=1)
    # Not `max_attempts`: endpoints and the HTTP retry policy count attempts at an LLM call.
    message_attempts: int = Field(3, ge=1, description="Attempts at processing one message before it goes to the DLQ.")
    shutdown_timeout_s: float = 20.0
    final_state_ttl_s: float = Field(
        600.0, ge=0, description="How long a service keeps a request's state (plan, latest status, dedup and written-id "
        "sets) after its final status, for late messages; the ids of released requests are still remembered as closed.",
    )


class PlannerSettings(BaseModel):
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


class GeneratorSettings(BaseModel):
    redis_url: str | None = Field(None, description="redis://127.0.0.1:6379/0 for a rate limit shared by all generator replicas.")
    replicas: int = Field(
        1, ge=1, description="Generator replicas expected to share the limit, until Redis reports the live count: while Redis is unreachable each keeps 1/N of it."
    )
    ratelimit_window_s: float = Field(60.0, gt=0, description="Window of the RPM/TPM limits (providers use 60 s; tests use shorter).")


class CuratorSettings(BaseModel):
    max_field_chars: int = Field(5_000, ge=1)
    raw_text_limit: int = Field(2_000, ge=100, description="Characters of raw model output kept on a rejection.")
    minhash_num_perm: int = Field(64, ge=16)


class SinkSettings(BaseModel):
    dir: str = Field("./sink", description="Where `serve sink` writes its JSONL shards, one folder per request.")
    shard_rows: int = Field(10_000, ge=1)
    fsync: bool = Field(True, description="fsync each row before its offset is committed (restart-safe).")


# The flat names settings had before they were grouped, as {flat name: (section, field)}. They keep
# working, as environment variables (DATACREATOR_KAFKA_BOOTSTRAP) and as keyword arguments; the
# nested spelling (DATACREATOR_KAFKA__BOOTSTRAP, kafka={"bootstrap": ...}) wins when both are given.
FLAT_NAMES: dict[str, tuple[str, str]] = {
    **{f"kafka_{name}": ("kafka", name) for name in KafkaSettings.model_fields if not name.startswith(("topic_", "max_"))},
    "topic_partitions": ("kafka", "topic_partitions"),
    "topic_replication_factor": ("kafka", "topic_replication_factor"),
    "max_message_bytes": ("kafka", "max_message_bytes"),
    "http_host": ("runtime", "http_host"),
    "http_port": ("runtime", "http_port"),
    "max_in_flight": ("runtime", "max_in_flight"),
    "max_attempts": ("runtime", "message_attempts"),
    "shutdown_timeout_s": ("runtime", "shutdown_timeout_s"),
    "final_state_ttl_s": ("runtime", "final_state_ttl_s"),
    **{name: ("planner", name) for name in PlannerSettings.model_fields},
    "redis_url": ("generator", "redis_url"),
    "generator_replicas": ("generator", "replicas"),
    "ratelimit_window_s": ("generator", "ratelimit_window_s"),
    **{name: ("curator", name) for name in CuratorSettings.model_fields},
    "sink_dir": ("sink", "dir"),
    "sink_shard_rows": ("sink", "shard_rows"),
    "sink_fsync": ("sink", "fsync"),
}


def _nest_flat(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with the flat names moved into their sections; a nested value wins over a flat one."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if key in FLAT_NAMES:
            section, name = FLAT_NAMES[key]
            nested.setdefault(section, {})[name] = value
    for key, value in values.items():
        if key in FLAT_NAMES:
            continue
        flat = nested.get(key)
        if isinstance(flat, dict):
            given = value.model_dump() if isinstance(value, BaseModel) else value
            if isinstance(given, Mapping):
                value = {**flat, **given}
        nested[key] = value
    return nested


class _FlatEnvSource(PydanticBaseSettingsSource):
    """The flat environment names (DATACREATOR_KAFKA_BOOTSTRAP), read after the nested ones so that those win."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole table at once

    def __call__(self) -> dict[str, Any]:
        prefix = str(self.config.get("env_prefix", "")).lower()
        environ = {name.lower(): value for name, value in os.environ.items()}
        found: dict[str, Any] = {}
        for flat, (section, name) in FLAT_NAMES.items():
            value = environ.get(prefix + flat)
            if value is None:
                continue
            annotation = _SECTIONS[section].model_fields[name].annotation
            found[flat] = json.loads(value) if get_origin(annotation) is dict else value
        return _nest_flat(found)


_SECTIONS: dict[str, type[BaseModel]] = {
    "kafka": KafkaSettings, "runtime": RuntimeSettings, "planner": PlannerSettings,
    "generator": GeneratorSettings, "curator": CuratorSettings, "sink": SinkSettings,
}


class Settings(BaseSettings):
    """Every service's settings, one section per reader: `kafka` (every client), `runtime` (every
    service runner), then one per service. DATACREATOR_KAFKA__BOOTSTRAP sets `kafka.bootstrap`;
    the flat names of FLAT_NAMES (DATACREATOR_KAFKA_BOOTSTRAP) still work."""

    model_config = SettingsConfigDict(env_prefix="DATACREATOR_", env_nested_delimiter="__", extra="ignore")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicNames = Field(default_factory=TopicNames)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    planner: PlannerSettings = Field(default_factory=PlannerSettings)
    generator: GeneratorSettings = Field(default_factory=GeneratorSettings)
    curator: CuratorSettings = Field(default_factory=CuratorSettings)
    sink: SinkSettings = Field(default_factory=SinkSettings)

    # LLM endpoints, read by the planner (prices) and the generator: a JSON object
    # {alias: EndpointConfig}, inline or in a file.
    endpoints_json: str | None = None
    endpoints_file: str | None = None

    def __init__(self, **values: Any) -> None:
        super().__init__(**_nest_flat(values))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FlatEnvSource(settings_cls), dotenv_settings, file_secret_settings

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
        caps = self.planner
        return OperatorCaps(max_tokens_per_call=caps.max_tokens_per_call, max_cost_per_request=caps.max_cost_per_request,
                            default_max_cost_usd=caps.default_max_cost_usd, prices=prices)

    def with_updates(self, **changes: Any) -> Settings:
        """A copy with some fields changed, by flat name (`kafka_bootstrap=`) or by section
        (`kafka={"bootstrap": ...}`, changing only the fields named); derived values such as
        `endpoints` are recomputed. A name that is no setting is an error, not a silent no-op."""
        update: dict[str, Any] = {}
        for key, value in _nest_flat(changes).items():
            if key not in type(self).model_fields:
                raise TypeError(f"no setting named {key!r}")
            current = getattr(self, key)
            if isinstance(value, Mapping) and isinstance(current, BaseModel):
                unknown = set(value) - set(type(current).model_fields)
                if unknown:
                    raise TypeError(f"no setting named {', '.join(f'{key}.{name}' for name in sorted(unknown))}")
                value = current.model_copy(update=dict(value))
            update[key] = value
        copy = self.model_copy(update=update)
        copy.__dict__.pop("endpoints", None)
        return copy

    def kafka_kwargs(self) -> dict[str, Any]:
        """Connection settings shared by every aiokafka client."""
        kafka = self.kafka
        kwargs: dict[str, Any] = {
            "bootstrap_servers": kafka.bootstrap,
            "security_protocol": kafka.security_protocol,
            "client_id": kafka.client_id,
        }
        if kafka.security_protocol.endswith("SSL"):
            import ssl

            # What aiokafka.helpers.create_ssl_context does, from the standard library.
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=kafka.ssl_cafile)
            if kafka.ssl_certfile:
                context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile)
            kwargs["ssl_context"] = context
        if kafka.security_protocol.startswith("SASL"):
            password = _secret_from(kafka.sasl_password, kafka.sasl_password_file)
            kwargs["sasl_mechanism"] = kafka.sasl_mechanism
            kwargs["sasl_plain_username"] = kafka.sasl_username
            kwargs["sasl_plain_password"] = password.get_secret_value() if password else None
        return kwargs

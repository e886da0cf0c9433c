"""Settings of the LLM simulator: latency, provider rate limits and faults."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MODEL_NAME = "datacreator-simulator"


def _share(description: str) -> Any:
    return Field(0.0, ge=0.0, le=1.0, description=description)


class SimulatorConfig(BaseModel):
    """Everything the simulator can be told; every field may change at run time (`/sim/config`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Provider rate limits over a sliding window of admitted requests (None: unlimited).
    rpm: int | None = Field(None, gt=0, description="Requests admitted per window.")
    tpm: int | None = Field(None, gt=0, description="Tokens admitted per window.")
    tpm_counts_max_tokens: bool = Field(
        True, description="A request costs prompt tokens + max_tokens (else + the completion tokens) at admission."
    )
    rate_window_s: float = Field(60.0, gt=0, description="Length of the sliding window; providers use 60 s.")

    # Latency of an admitted request.
    latency: Literal["fixed", "normal", "longtail"] = Field("fixed", description="Distribution of the delay of an answer.")
    latency_s: float = Field(0.0, ge=0, description="fixed: the delay; normal: the mean; longtail: the median.")
    latency_sd_s: float = Field(0.0, ge=0, description="normal: standard deviation.")
    latency_p99_s: float | None = Field(None, ge=0, description="longtail: 99th percentile (default 5x the median).")
    latency_per_token_s: float = Field(0.0, ge=0, description="Extra delay per completion token.")

    # Faults, as shares of requests (item-level faults: shares of items).
    error_rate: float = _share("Share of admitted requests answered 500 or 503.")
    timeout_rate: float = _share("Share of admitted requests held for timeout_hold_s before the answer.")
    timeout_hold_s: float = Field(30.0, ge=0, description="How long a timeout fault holds the request before answering.")
    malformed_rate: float = _share("Share of answers whose text is not valid JSON.")
    malformed_truncated_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Of malformed answers, the share cut short; the rest are fenced JSON with prose after it."
    )
    wrong_structure_rate: float = _share("Share of items with a key missing or a value of the wrong type.")
    label_out_of_space_rate: float = _share("Share of items whose label lies outside the label space.")
    copy_rate: float = _share("Share of items that copy the formatting example verbatim.")
    storm_429_rate: float = _share("Share of requests answered 429 whatever the rate limits (a 429 storm).")
    storm_retry_after_s: int = Field(1, ge=1, description="Retry-After of a 429 storm answer.")

    verify_agreement: float = Field(
        1.0, ge=0.0, le=1.0, description="Label checks: share of items a verification call labels as they were created."
    )

    seed: int = Field(0, description="Seed of every random choice (faults, text, latency).")
    api_key: str | None = Field(None, repr=False, description="When set, requests need `Authorization: Bearer <key>`.")

    def public_dump(self) -> dict[str, Any]:
        """The settings without the key (for answers and logs)."""
        data = self.model_dump()
        data["api_key"] = "***" if self.api_key else None
        return data

    def patched(self, changes: dict[str, Any]) -> SimulatorConfig:
        """A validated copy with `changes` applied."""
        return SimulatorConfig.model_validate({**self.model_dump(), **changes})

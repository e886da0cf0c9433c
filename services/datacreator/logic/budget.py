"""Hard cost budgets: what a task may cost at worst, and what a request has committed.

A request's spend is what its outcomes reported plus what the tasks still in flight might cost at
worst. A task is issued only when that worst case still fits under `max_cost_usd`; its outcome
replaces the reservation with the real cost. The worst case of one task is every attempt it may
make billed in full: a prompt no longer than one token per UTF-8 byte (a byte-level BPE token
covers at least one byte) plus `max_tokens` of completion, at the endpoint's prices. So the
reported cost can only pass the budget if a provider bills more than it was asked to produce.

Operator caps (`OperatorCaps`) bound what one request may ask for at all; they are checked when a
request is validated, so a request over them is REJECTED with the cap named.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from datacreator.contracts import CreationRequest, GenerationTask
from datacreator.logic.prompt import build_messages

# Chat templates add a few tokens per message (role markers, separators).
_TOKENS_PER_MESSAGE = 16


class EndpointPrice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_per_1m: float = Field(0.0, ge=0)
    output_per_1m: float = Field(0.0, ge=0)
    max_attempts: int = Field(1, ge=1, description="HTTP attempts one task may make at this endpoint.")


class OperatorCaps(BaseModel):
    """Service-wide bounds on one request, and the prices the planner budgets with."""

    model_config = ConfigDict(extra="forbid")

    max_tokens_per_call: int | None = Field(None, ge=16)
    max_cost_per_request: float | None = Field(None, gt=0)
    default_max_cost_usd: float | None = Field(None, gt=0, description="Budget of a request that names none.")
    prices: dict[str, EndpointPrice] = Field(default_factory=dict)


def check_caps(request: CreationRequest, caps: OperatorCaps) -> str | None:
    """Why the request passes an operator cap, or None."""
    if caps.max_tokens_per_call is not None and request.model.max_tokens > caps.max_tokens_per_call:
        return f"model.max_tokens {request.model.max_tokens} exceeds the operator limit of {caps.max_tokens_per_call}"
    asked = request.budget.max_cost_usd
    if caps.max_cost_per_request is not None and asked is not None and asked > caps.max_cost_per_request:
        return f"budget.max_cost_usd {asked:g} exceeds the operator limit of {caps.max_cost_per_request:g} per request"
    return None


def prompt_tokens_upper(messages: list[dict[str, Any]]) -> int:
    """Most tokens these messages can be, for any byte-level tokenizer."""
    return sum(len(str(m.get("content", "")).encode()) + _TOKENS_PER_MESSAGE for m in messages)


class BudgetLedger:
    """The cost arithmetic of one request. Pure: the plan keeps the numbers in its snapshot."""

    def __init__(self, request: CreationRequest, caps: OperatorCaps) -> None:
        self.price = caps.prices.get(request.model.endpoint, EndpointPrice())
        limit = request.budget.max_cost_usd
        if limit is None:
            limit = caps.default_max_cost_usd if caps.default_max_cost_usd is not None else caps.max_cost_per_request
        self.max_cost_usd = limit

    @property
    def priced(self) -> bool:
        return bool(self.price.input_per_1m or self.price.output_per_1m)

    def worst_case(self, task: GenerationTask) -> float:
        """Most the task can cost: every attempt billed for its whole prompt and max_tokens."""
        if not self.priced:
            return 0.0
        # The response_format schema travels in the request and counts as prompt too.
        prompt = prompt_tokens_upper(build_messages(task)) + 2 * len(orjson.dumps(task.example_schema))
        one = (prompt * self.price.input_per_1m + task.model.max_tokens * self.price.output_per_1m) / 1_000_000
        return one * self.price.max_attempts

    def fits(self, spent: float, reserved: dict[str, float], amount: float) -> bool:
        """Whether a task reserving `amount` may be issued now."""
        if self.max_cost_usd is None or not self.priced:
            return True
        return spent + sum(reserved.values()) + amount <= self.max_cost_usd

    def exhausted(self, spent: float, reserved: dict[str, float], in_flight: int, calls: int) -> bool:
        """Whether no task may be issued any more.

        Without prices a worst case is unknown: the calls in flight are then expected to cost what
        calls cost so far (`calls` outcomes made `spent`), which bounds nothing before the first
        outcome. Give endpoints their prices for a hard budget.
        """
        if self.max_cost_usd is None:
            return False
        if self.priced:
            return spent + sum(reserved.values()) >= self.max_cost_usd
        mean = spent / calls if calls else 0.0
        return spent >= self.max_cost_usd or (in_flight > 0 and spent + in_flight * mean >= self.max_cost_usd)

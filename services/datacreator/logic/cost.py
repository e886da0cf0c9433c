"""What LLM calls cost, from their token usage and the endpoint's prices."""

from __future__ import annotations

from dataclasses import dataclass

from datacreator.contracts import Usage


def call_cost_usd(usage: Usage, input_price_per_1m: float, output_price_per_1m: float) -> float:
    return (usage.prompt_tokens * input_price_per_1m + usage.completion_tokens * output_price_per_1m) / 1_000_000


@dataclass
class CostAccumulator:
    """Running totals of one request's calls."""

    calls: int = 0
    failed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, usage: Usage, cost_usd: float, ok: bool = True) -> None:
        self.calls += 1
        if not ok:
            self.failed_calls += 1
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cost_usd += cost_usd

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def over_budget(self, max_cost_usd: float | None = None, max_llm_calls: int | None = None) -> bool:
        if max_cost_usd is not None and self.cost_usd >= max_cost_usd:
            return True
        return max_llm_calls is not None and self.calls >= max_llm_calls

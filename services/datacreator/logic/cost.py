"""What LLM calls cost, from their token usage and the endpoint's prices."""

from __future__ import annotations

from datacreator.contracts import Usage


def call_cost_usd(usage: Usage, input_price_per_1m: float, output_price_per_1m: float) -> float:
    return (usage.prompt_tokens * input_price_per_1m + usage.completion_tokens * output_price_per_1m) / 1_000_000

"""The verification call: after a generation call, one batched call asks a verifier to label each
created input blind. It goes through the verifier endpoint's `LLMClient`, so its rate limit (RPM and
TPM), retries, circuit breaker and cost accounting are those of every other call to that endpoint.
"""

from __future__ import annotations

import functools
import logging

from datacreator import metrics
from datacreator.contracts import GenerationTask, Usage, Verification, VerifyMode
from datacreator.llm.client import LLMPool
from datacreator.logic.verify import (
    build_verify_messages,
    label_space,
    parse_verifier_answer,
    verify_response_format,
    verify_targets,
    verify_task,
)

log = logging.getLogger("datacreator.verify")


async def verify_answer(pool: LLMPool, task: GenerationTask, raw_output: str | None) -> Verification | None:
    """The verifier's labels for the items of `raw_output` (None when verify is off or there is no answer)."""
    if task.verify is VerifyMode.off or raw_output is None or not task.label_field:
        return None
    targets = verify_targets(task, raw_output)
    alias = task.verify_endpoint or task.model.endpoint
    labels: list = [None] * targets.parsed
    if not targets.items:
        return Verification(endpoint=alias, model=task.model.name or "unknown", labels=labels)
    vtask = verify_task(task, len(targets.items))
    try:
        client = pool.get(alias)
    except KeyError as exc:
        return Verification(endpoint=alias, model="unknown", labels=labels, error=str(exc.args[0] if exc.args else exc))
    messages = build_verify_messages(task, targets.items)
    result = await client.complete(vtask, messages, functools.partial(_format, n=len(targets.items)))
    usage = result.usage if isinstance(result.usage, Usage) else Usage.model_validate(result.usage)
    metrics.verify_calls.labels(alias, result.outcome).inc()
    metrics.verify_tokens.labels(alias, "prompt").inc(usage.prompt_tokens)
    metrics.verify_tokens.labels(alias, "completion").inc(usage.completion_tokens)
    if result.cost_usd:
        metrics.verify_cost_usd.labels(alias).inc(result.cost_usd)
    if result.ok:
        for index, label in zip(targets.indexes, parse_verifier_answer(result.text, len(targets.items), label_space(task))):
            labels[index] = label
    else:
        log.warning("verification call to %s failed; %d items stay unverified: %s", alias, len(targets.items), result.error)
    return Verification(
        endpoint=alias, model=result.model, labels=labels, usage=usage, cost_usd=result.cost_usd,
        latency_s=result.latency_s, calls=1, error=result.error,
    )


def _format(task: GenerationTask, mode: str, n: int) -> dict | None:
    return verify_response_format(task, n, mode)

"""Prometheus metrics of every service, defined once.

Labels are bounded in cardinality: topic, service, endpoint alias, reason, outcome, state. A
request_id never becomes a label; per-request figures go on the status topic instead.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

NAMESPACE = "datacreator"

# Bus (every service)
messages_consumed = Counter(
    "messages_consumed", "Messages consumed, by topic.", ["service", "topic"], namespace=NAMESPACE
)
messages_produced = Counter(
    "messages_produced", "Messages produced and acknowledged by the broker, by topic.", ["service", "topic"], namespace=NAMESPACE
)
messages_dead_lettered = Counter(
    "messages_dead_lettered", "Messages sent to the dead-letter topic, by source topic.", ["service", "topic"], namespace=NAMESPACE
)
processing_errors = Counter(
    "processing_errors", "Failed attempts at processing a message.", ["service", "topic"], namespace=NAMESPACE
)
in_flight = Gauge("in_flight_messages", "Messages being processed now.", ["service"], namespace=NAMESPACE)
consumer_lag = Gauge(
    "consumer_lag_messages", "Messages not yet consumed, per partition.", ["service", "topic", "partition"], namespace=NAMESPACE
)
processing_seconds = Histogram(
    "processing_seconds",
    "Time to process one message.",
    ["service", "topic"],
    namespace=NAMESPACE,
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
service_up = Gauge("service_up", "1 while the service's consumer loop runs.", ["service"], namespace=NAMESPACE)

# Curator
examples_accepted = Counter("examples_accepted", "Examples published to the examples topic.", namespace=NAMESPACE)
examples_rejected = Counter("examples_rejected", "Candidate examples rejected, by reason.", ["reason"], namespace=NAMESPACE)
dedup_state_entries = Gauge("dedup_state_entries", "Examples held in the curator's dedup state.", namespace=NAMESPACE)
dedup_requests = Gauge("dedup_requests", "Requests whose dedup state the curator holds.", namespace=NAMESPACE)

# Generator
llm_calls = Counter(
    "llm_calls", "LLM HTTP calls by endpoint alias and outcome (ok, 429, 5xx, timeout, connection, malformed).",
    ["endpoint", "outcome"], namespace=NAMESPACE,
)
llm_tokens = Counter("llm_tokens", "Tokens used, by endpoint alias and kind (prompt, completion).", ["endpoint", "kind"], namespace=NAMESPACE)
llm_cost_usd = Counter("llm_cost_usd", "Cost of LLM calls in US dollars.", ["endpoint"], namespace=NAMESPACE)
llm_latency_seconds = Histogram(
    "llm_latency_seconds",
    "Latency of successful LLM calls.",
    ["endpoint"],
    namespace=NAMESPACE,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
)
llm_in_flight = Gauge("llm_in_flight_calls", "LLM calls under way.", ["endpoint"], namespace=NAMESPACE)
llm_tasks_failed = Counter("llm_tasks_failed", "Tasks whose call failed after every attempt.", ["endpoint"], namespace=NAMESPACE)
ratelimit_wait_seconds = Histogram(
    "ratelimit_wait_seconds",
    "Time a call waited for the rate limiter.",
    ["endpoint"],
    namespace=NAMESPACE,
    buckets=(0.0, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60),
)
ratelimit_usage_ratio = Gauge(
    "ratelimit_usage_ratio", "Share of the limit in use over the last window, by kind (requests, tokens).",
    ["endpoint", "kind"], namespace=NAMESPACE,
)
ratelimit_limit = Gauge("ratelimit_limit_per_minute", "Configured limit per minute, by kind.", ["endpoint", "kind"], namespace=NAMESPACE)
ratelimit_fallback = Gauge(
    "ratelimit_local_fallback", "1 while the shared (Redis) limiter is unreachable and a local share is used.",
    ["endpoint"], namespace=NAMESPACE,
)
circuit_open = Gauge("circuit_open", "1 while the endpoint's circuit breaker is open.", ["endpoint"], namespace=NAMESPACE)

# Planner
requests_by_state = Gauge("requests", "Requests known to this planner, by state.", ["state"], namespace=NAMESPACE)
requests_total = Counter("requests_finished", "Requests that reached a final state, by state.", ["state"], namespace=NAMESPACE)
tasks_planned = Counter("tasks_planned", "Tasks published, by strategy.", ["strategy"], namespace=NAMESPACE)
strategy_fallbacks = Counter(
    "strategy_fallbacks", "Calls whose formatting example fell back to the chain's last good one.", ["strategy"], namespace=NAMESPACE
)

# Label checks (verify): the verification calls are also in the llm_* series of their endpoint
verify_calls = Counter(
    "verify_calls", "Verification calls by endpoint alias and outcome (ok, or why it failed).", ["endpoint", "outcome"], namespace=NAMESPACE
)
verify_tokens = Counter("verify_tokens", "Tokens used by verification calls, by kind (prompt, completion).", ["endpoint", "kind"], namespace=NAMESPACE)
verify_cost_usd = Counter("verify_cost_usd", "Cost of verification calls in US dollars.", ["endpoint"], namespace=NAMESPACE)
verify_items = Counter(
    "verify_items", "Valid items by what the verifier's label did: agree, disagree (rejected or relabelled), unverified.",
    ["result"], namespace=NAMESPACE,
)


def observe_verification(tally: object | None) -> None:
    """Count one task's label-check tally (a contracts.VerifyTally) in the curator's metrics."""
    if tally is None:
        return
    checked = sum(getattr(tally, "checked", {}).values())
    disagreed = sum(getattr(tally, "disagreed", {}).values())
    verify_items.labels("agree").inc(checked - disagreed)
    verify_items.labels("disagree").inc(disagreed)
    verify_items.labels("unverified").inc(getattr(tally, "unverified", 0))

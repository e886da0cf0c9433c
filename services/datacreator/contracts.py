"""Message contracts: every message on every topic, as pydantic v2 models.

These models are the public contract of the bus. `datacreator schemas` writes their JSON
Schemas into `schemas/`, and a test fails when the files drift from the models, so a change
here is a change of the contract: bump SCHEMA_VERSION when it is not backward compatible.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1

# Bounds that make a request safe to process; the planner rejects anything beyond them.
MAX_TARGET_COUNT = 1_000_000
MAX_EXAMPLES_PER_CALL = 50
MAX_INSTRUCTION_CHARS = 20_000
MAX_CHAINS = 256

JsonObject = dict[str, Any]


def now() -> float:
    return time.time()


def new_request_id() -> str:
    return uuid.uuid4().hex


class Strategy(StrEnum):
    """How the next call's formatting example is chosen (self-reference)."""

    none = "none"
    random = "random"
    contrastive = "contrastive"
    similar = "similar"
    tree = "tree"


class RequestState(StrEnum):
    ACCEPTED = "ACCEPTED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    CANCELLED = "CANCELLED"
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"

    @property
    def final(self) -> bool:
        return self not in (RequestState.ACCEPTED, RequestState.RUNNING)


class RejectReason(StrEnum):
    """Why an item of a candidate (a model's answer) did not reach the examples topic."""

    unparseable = "unparseable"
    structure_mismatch = "structure_mismatch"
    label_out_of_space = "label_out_of_space"
    empty_field = "empty_field"
    field_too_long = "field_too_long"
    copy_of_reference = "copy_of_reference"
    duplicate = "duplicate"
    near_duplicate = "near_duplicate"
    semantic_duplicate = "semantic_duplicate"
    surplus = "surplus"  # valid and new, but the request already has target_count examples
    request_closed = "request_closed"  # the request was cancelled or ended meanwhile
    duplicate_key = "duplicate_key"  # an object of the item names one key twice
    llm_error = "llm_error"  # the call itself failed after all retries: no output at all
    label_disagreement = "label_disagreement"  # verify=reject: a blind verifier gave another label


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------
# datacreator.requests


class ModelSpec(_Part):
    endpoint: str = Field("default", min_length=1, max_length=100, description="Endpoint alias from configuration.")
    name: str | None = Field(None, max_length=200, description="Model name; the endpoint's default when absent.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="Nucleus sampling; the endpoint's default when absent (the paper's code used 0).")
    max_tokens: int = Field(2048, ge=16, le=32_768)


class Budget(_Part):
    max_cost_usd: float | None = Field(None, gt=0)
    max_llm_calls: int | None = Field(None, gt=0)


class DedupSpec(_Part):
    near_duplicate_threshold: float | None = Field(
        0.85, gt=0.0, le=1.0, description="Jaccard similarity of word shingles above which an example is a near-duplicate; null turns near dedup off."
    )
    semantic_threshold: float | None = Field(
        None, gt=0.0, le=1.0, description="Cosine similarity of sentence embeddings above which an example is a semantic duplicate; null (default) turns it off."
    )


# -- label checks (verify): request fields, per-task settings, candidate and outcome parts ------


class VerifyMode(StrEnum):
    """What a blind verifier's label does: nothing (off), drop a disagreeing item, or replace its label."""

    off = "off"
    reject = "reject"
    relabel = "relabel"


class Verification(_Part):
    """The verifier's answer for one candidate: labels aligned with the parsed items (null: not checked)."""

    endpoint: str
    model: str
    labels: list[Any] = Field(default_factory=list, description="One entry per parsed item, in order; null where the item was not checked.")
    usage: Usage = Field(default_factory=lambda: Usage())
    cost_usd: float = 0.0
    latency_s: float = 0.0
    calls: int = Field(0, description="Verification calls made (0 when no item needed checking).")
    error: str | None = Field(None, description="Why the verification call failed (its items stay unchecked).")


class VerifyTally(_Part):
    """What label checks did for one task: calls, usage, and per created label how many were checked and disagreed."""

    calls: int = 0
    usage: Usage = Field(default_factory=lambda: Usage())
    cost_usd: float = 0.0
    checked: dict[str, int] = Field(default_factory=dict, description="Items the verifier labelled, by created label.")
    disagreed: dict[str, int] = Field(default_factory=dict, description="Of those, the ones it labelled otherwise, by created label.")
    unverified: int = Field(0, description="Valid items without a usable verifier label (call failed or answer malformed).")


class CreationRequest(_Message):
    """Ask for `target_count` new examples shaped like `formatting_example`."""

    kind: Literal["create"] = "create"
    request_id: str = Field(default_factory=new_request_id, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    instruction: str = Field(..., min_length=1, max_length=MAX_INSTRUCTION_CHARS)
    formatting_example: JsonObject
    target_count: int = Field(..., ge=1, le=MAX_TARGET_COUNT)
    examples_per_call: int = Field(5, ge=1, le=MAX_EXAMPLES_PER_CALL)
    strategy: Strategy = Strategy.random
    chains: int = Field(8, ge=1, le=MAX_CHAINS, description="Parallel self-reference chains (for tree: calls in flight at once).")
    tree_branching: int = Field(5, ge=1, le=MAX_EXAMPLES_PER_CALL, description="Tree strategy: most children kept per node.")
    reference_pool: Literal["previous_call", "all_accepted"] = Field(
        "previous_call", description="Where self-reference draws from: the chain's previous call (the paper's rule) or every accepted example."
    )
    label_field: str | None = Field(None, max_length=200, description="Dotted path of the label; inferred when absent.")
    label_space: list[Any] | None = Field(None, max_length=1000)
    label_plan: Literal["on", "off"] = Field(
        "on", description="on: every item of a call is given a target label so the accepted labels follow label_distribution; off: the model picks."
    )
    label_distribution: dict[str, Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] | None = Field(
        None, max_length=1000,
        description="Target share per label (a label's JSON text as key, a bare string for string labels); uniform when absent. Shares are normalised.",
    )
    allow_extra_keys: bool = False
    model: ModelSpec = Field(default_factory=ModelSpec)
    budget: Budget = Field(default_factory=Budget)
    dedup: DedupSpec = Field(default_factory=DedupSpec)
    metadata: JsonObject = Field(default_factory=dict)
    created_at: float = Field(default_factory=now)
    # label checks (verify)
    verify: VerifyMode = Field(VerifyMode.off, description="Blind label check of every created item: off, reject disagreements, or relabel them.")
    verify_endpoint: str | None = Field(None, min_length=1, max_length=100, description="Endpoint alias of the verifier; the request's own when absent.")

    @field_validator("formatting_example")
    @classmethod
    def _non_empty_example(cls, value: JsonObject) -> JsonObject:
        if not value:
            raise ValueError("formatting_example must be a non-empty JSON object")
        return value


class CancelRequest(_Message):
    """Stop a request; work already in flight is dropped downstream."""

    kind: Literal["cancel"] = "cancel"
    request_id: str = Field(..., min_length=1, max_length=128)
    reason: str = Field("cancelled by user", max_length=1000)
    created_at: float = Field(default_factory=now)


RequestMessage = Annotated[CreationRequest | CancelRequest, Field(discriminator="kind")]


# ---------------------------------------------------------------------------------------------
# datacreator.tasks


class Reference(_Part):
    """An example used as a formatting example for a call; `example_id` is null for the seed."""

    example_id: str | None = None
    data: JsonObject


class GenerationTask(_Message):
    """One LLM call's worth of work. Carries everything a stateless generator needs."""

    task_id: str = Field(..., description="Deterministic: the same planning step always yields the same id.")
    request_id: str
    chain: int = Field(..., ge=0, description="Chain index, or the tree node's position in its level.")
    step: int = Field(..., ge=0, description="Call number within the chain, or the tree level being created.")
    strategy: Strategy
    instruction: str
    references: list[Reference] = Field(..., min_length=1)
    num_examples: int = Field(..., ge=1, le=MAX_EXAMPLES_PER_CALL)
    target_count: int
    example_schema: JsonObject = Field(..., description="JSON Schema of one example, derived from the formatting example.")
    label_field: str | None = None
    label_space: list[Any] | None = None
    planned_labels: list[Any] | None = Field(
        None, description="The label each item of the answer must carry, in order (label plan on); num_examples items."
    )
    allow_extra_keys: bool = False
    dedup: DedupSpec = Field(default_factory=DedupSpec)
    model: ModelSpec
    created_at: float = Field(default_factory=now)
    # label checks (verify)
    verify: VerifyMode = VerifyMode.off
    verify_endpoint: str | None = Field(None, description="Endpoint alias of the verifier; model.endpoint when null.")


# ---------------------------------------------------------------------------------------------
# datacreator.candidates


class Usage(_Part):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Candidate(_Message):
    """A model's raw answer to one task, or the reason there is none."""

    task: GenerationTask
    endpoint: str
    model: str
    raw_output: str | None = Field(None, description="The model's text; null when the call failed.")
    error: str | None = Field(None, description="Why the call failed after all attempts (no secrets).")
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    latency_s: float = 0.0
    attempts: int = 1
    throttled: int = Field(0, ge=0, description="Attempts the provider answered with 429 (rate limited).")
    created_at: float = Field(default_factory=now)
    # label checks (verify)
    verification: Verification | None = Field(None, description="The verifier's labels and the verification call's usage; null when verify is off.")


# ---------------------------------------------------------------------------------------------
# datacreator.examples — the product


class Example(_Message):
    example_id: str = Field(..., description="sha256 of request_id and the normalised example: a redelivery carries the same id.")
    request_id: str
    data: JsonObject
    strategy: Strategy
    reference_ids: list[str | None] = Field(..., description="Ids of the formatting examples it was made from (null: the seed).")
    task_id: str
    chain: int
    step: int
    model: str
    created_at: float = Field(default_factory=now)
    # label checks (verify)
    verified: bool | None = Field(None, description="True: a blind verifier gave the same label (or its label was taken); null: not checked.")
    relabelled_from: Any = Field(None, description="verify=relabel: the created label the verifier's replaced; null when kept.")


# ---------------------------------------------------------------------------------------------
# datacreator.rejected


class Rejection(_Message):
    request_id: str
    task_id: str
    reason: RejectReason
    detail: str = ""
    item: Any = Field(None, description="The rejected item when it parsed, else null.")
    raw: str | None = Field(None, description="Raw text (truncated) when the item did not parse.")
    created_at: float = Field(default_factory=now)


# ---------------------------------------------------------------------------------------------
# datacreator.outcomes (curator -> planner): what one task produced, after curation


class AcceptedRef(_Part):
    example_id: str
    data: JsonObject


class TaskOutcome(_Message):
    task_id: str
    request_id: str
    chain: int
    step: int
    references: list[Reference]
    accepted: list[AcceptedRef] = Field(default_factory=list)
    rejected: dict[str, int] = Field(default_factory=dict, description="Rejections of this task by reason.")
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    latency_s: float = 0.0
    attempts: int = Field(1, ge=0, description="HTTP attempts the task's call made (what max_llm_calls counts).")
    throttled: int = Field(0, ge=0, description="Attempts the provider answered with 429 (rate limited).")
    error: str | None = None
    target_reached: bool = False
    model: str | None = Field(None, description="The model that answered the call, as the generator named it.")
    created_at: float = Field(default_factory=now)
    # label checks (verify)
    verification: VerifyTally | None = None


# ---------------------------------------------------------------------------------------------
# datacreator.status (compacted, key = request_id)


class RequestStatus(_Message):
    """The latest state of a request. The topic is compacted, and compaction keeps a key's record
    of highest offset, not its newest: readers keep the status for which `supersedes` holds."""

    request_id: str
    state: RequestState
    version: int = Field(
        0, ge=0,
        description="Monotonic per request (the planner's write count, carried in its snapshots): readers keep the highest; 0 from writers without one.",
    )
    target_count: int = 0
    accepted: int = 0
    rejected: dict[str, int] = Field(default_factory=dict)
    llm_calls: int = 0
    failed_calls: int = 0
    throttled_calls: int = Field(0, description="Attempts the provider answered with 429 (rate limited).")
    tasks_in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    examples_per_second: float = 0.0
    fallbacks: int = Field(0, description="Calls whose formatting example fell back to the chain's last good one.")
    strategy: Strategy | None = None
    model: str | None = Field(None, description="The model asked for, else the one that answered.")
    temperature: float | None = None
    top_p: float | None = None
    label_field: str | None = None
    label_counts: dict[str, int] = Field(default_factory=dict, description="Accepted examples per label (the label's text as key).")
    label_targets: dict[str, int] | None = Field(None, description="The label plan's target per label; null when the plan is off.")
    error: str | None = None
    started_at: float | None = None
    updated_at: float = Field(default_factory=now)
    finished_at: float | None = None
    # label checks (verify): part of the totals above (tokens, cost), shown apart; llm_calls counts generation calls only
    verify_calls: int = 0
    verify_prompt_tokens: int = 0
    verify_completion_tokens: int = 0
    verify_cost_usd: float = 0.0
    verify_checked: dict[str, int] = Field(default_factory=dict, description="Items the verifier labelled, by created label.")
    verify_disagreements: dict[str, int] = Field(default_factory=dict, description="Of those, the ones it labelled otherwise, by created label.")
    verify_unverified: int = 0

    def supersedes(self, previous: RequestStatus | None) -> bool:
        """Whether this status replaces `previous` of the same request.

        A final status is never replaced by a non-final one (a retried RUNNING that lands after
        COMPLETED); otherwise the higher version wins, and `updated_at` decides between equal
        versions (ticker statuses repeat their snapshot's version; records without one are 0).
        Offsets and clocks are not used to order: a record retried by a producer lands late, and
        a planner that took the request over on another host has another clock.
        """
        if previous is None:
            return True
        if previous.state.final and not self.state.final:
            return False
        if self.version != previous.version:
            return self.version > previous.version
        return self.updated_at >= previous.updated_at



class DeadLetter(_Message):
    service: str
    source_topic: str
    partition: int
    offset: int
    key: str | None = None
    value: str = Field(..., description="The message as received (utf-8, undecodable bytes replaced; truncated).")
    error: str
    error_type: str
    attempts: int = 1
    created_at: float = Field(default_factory=now)


# ---------------------------------------------------------------------------------------------
# datacreator.planner-state (compacted, key = request_id): the planner's own snapshots


class PlannerSnapshot(_Message):
    """Internal to the planner: what it needs to resume a request after a restart."""

    request_id: str
    plan: JsonObject
    version: int = Field(
        0, ge=0,
        description="Monotonic per request: a restore keeps the highest, whatever the order the records landed in.",
    )
    created_at: float = Field(default_factory=now)


# Every message type on the bus, by the schema file name it is published under.
MESSAGE_MODELS: dict[str, type[BaseModel]] = {
    "creation_request": CreationRequest,
    "cancel_request": CancelRequest,
    "generation_task": GenerationTask,
    "candidate": Candidate,
    "example": Example,
    "rejection": Rejection,
    "task_outcome": TaskOutcome,
    "request_status": RequestStatus,
    "dead_letter": DeadLetter,
    "planner_snapshot": PlannerSnapshot,
}

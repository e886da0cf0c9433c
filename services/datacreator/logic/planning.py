"""The planner's per-request state machine, free of any bus.

A `RequestPlan` turns one `CreationRequest` into `GenerationTask`s and folds the `TaskOutcome`s
back in, until the request is COMPLETED, FAILED (stalled), BUDGET_EXHAUSTED or CANCELLED.

Self-reference runs `request.chains` parallel chains, one call in flight per chain; a chain's
next formatting example is chosen from what its previous call had accepted (see
`logic.strategies`). The tree strategy expands breadth-first levels instead, with at most
`request.chains` calls in flight.

Where the label space is known and `label_plan` is on, every call's items get their labels from
the request's `LabelPlan` (`logic.labels`): what each label still lacks of its target, counting
accepted examples and the labels of calls in flight. The last calls ask only for what is missing.

`validate_request` works out the label, the schema and the label plan once; `RequestPlan.start`
takes its `ValidatedRequest`, and the snapshot carries them.

Driving a plan (the service's side):
- `next_tasks(now, embed)` may call `embed` (a sentence model) for the contrastive and similar
  strategies, so run it in a worker thread there; a plan is not thread-safe, so never call two
  of its methods at once.
- Snapshot after `next_tasks` and before publishing its tasks. After a restart, `restore` the
  snapshot and publish `in_flight_tasks()` again: task ids are deterministic, so a task that had
  already gone out is the same task, and an outcome is applied at most once (by task id).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from datacreator.contracts import (
    MAX_TARGET_COUNT,
    AcceptedRef,
    CreationRequest,
    GenerationTask,
    Reference,
    RejectReason,
    RequestState,
    RequestStatus,
    Strategy,
    TaskOutcome,
    VerifyMode,
)
from datacreator.logic.budget import BudgetLedger, OperatorCaps, check_caps
from datacreator.logic.labels import LabelPlan, label_of
from datacreator.logic.shape import example_schema, get_path, infer_label, label_path_in_objects
from datacreator.logic.strategies import EmbedFn, as_embed_fn, derive_rng, select_reference, shuffled, tree_children
from datacreator.logic.validation import request_fields_problem
from datacreator.logic.verify import add_tally

SNAPSHOT_VERSION = 2  # 2: the label and schema worked out once, the label plan
_MISSING = object()


class PlannerLimits(BaseModel):
    """Bounds that keep one request cheap to plan and its snapshot small."""

    model_config = ConfigDict(extra="forbid")

    max_example_bytes: int = Field(64 * 1024, ge=2, description="Serialised size of the formatting example.")
    max_depth: int = Field(16, ge=1, description="Nesting of objects and lists in the formatting example.")
    max_string_chars: int = Field(20_000, ge=1, description="Longest string (key or value) in the formatting example.")
    max_nodes: int = Field(10_000, ge=1, description="Keys, items and values in the formatting example.")
    max_target_count: int = Field(MAX_TARGET_COUNT, ge=1)
    max_examples_in_flight: int = Field(2_000, ge=1, description="Cap on examples_per_call * chains.")
    stall_calls: int = Field(30, ge=1, description="Calls in a row with no new accepted example before the request fails.")
    max_tree_level_nodes: int = Field(256, ge=1, description="Tree strategy: nodes kept per level.")
    pool_size: int = Field(256, ge=1, description="reference_pool=all_accepted: examples kept to draw from (reservoir sample).")
    caps: OperatorCaps = Field(default_factory=OperatorCaps, description="Operator caps and endpoint prices (logic.budget).")
    task_deadline_s: float = Field(
        1800.0, gt=0, description="A task in flight this long without its outcome is issued again (same task id).")
    max_task_issues: int = Field(
        3, ge=1, description="Issues of one task without an outcome before it counts as a failed call.")


# ---------------------------------------------------------------------------------------------
# Validation


def _walk_limits(value: Any, limits: PlannerLimits) -> str | None:
    nodes = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            return f"formatting example has more than {limits.max_nodes} values"
        if isinstance(item, dict | list):
            if depth > limits.max_depth:
                return f"formatting example is nested deeper than {limits.max_depth} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    if len(str(key)) > limits.max_string_chars:
                        return f"formatting example has a key longer than {limits.max_string_chars} characters"
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str) and len(item) > limits.max_string_chars:
            return f"formatting example has a string longer than {limits.max_string_chars} characters"
    return None


def resolve_label(request: CreationRequest) -> tuple[str | None, list[Any] | None]:
    """The request's label field and space, each inferred from the seed when not given."""
    field, space = request.label_field, request.label_space
    if space is None:
        inferred_field, inferred_space = infer_label(request.formatting_example, field)
        if field is None:
            field = inferred_field
        if field == inferred_field:
            space = inferred_space
    elif field is None:
        field, _ = infer_label(request.formatting_example)
    return field, space


class RequestRejected(ValueError):
    """The request cannot run; the message is the reason its REJECTED status gives."""


@dataclass(frozen=True)
class ValidatedRequest:
    """A request that can run, with what validation worked out: its label, schema and label plan."""

    request: CreationRequest
    label_field: str | None
    label_space: list[Any] | None
    example_schema: dict[str, Any]
    label_plan: LabelPlan | None


def validate_request(request: CreationRequest, known_endpoints: set[str] | None, limits: PlannerLimits) -> ValidatedRequest:
    """The request with its label and schema; raises `RequestRejected` saying why it cannot run."""
    reason, validated = _validate(request, known_endpoints, limits)
    if reason is not None:
        raise RequestRejected(reason)
    assert validated is not None
    return validated


def _validate(
    request: CreationRequest, known_endpoints: set[str] | None, limits: PlannerLimits
) -> tuple[str | None, ValidatedRequest | None]:
    if known_endpoints is not None and request.model.endpoint not in known_endpoints:
        return f"unknown endpoint {request.model.endpoint!r}", None
    if (unbounded := request_fields_problem(request)) is not None:
        return unbounded, None
    if (capped := check_caps(request, limits.caps)) is not None:
        return capped, None
    if request.target_count > limits.max_target_count:
        return f"target_count {request.target_count} exceeds the limit of {limits.max_target_count}", None
    parallel = request.examples_per_call * request.chains
    if parallel > limits.max_examples_in_flight:
        return (
            f"examples_per_call * chains = {parallel} exceeds the limit of {limits.max_examples_in_flight}"
        ), None
    seed = request.formatting_example
    try:
        size = len(orjson.dumps(seed))
    except TypeError as exc:
        return f"formatting example is not JSON: {exc}", None
    if size > limits.max_example_bytes:
        return f"formatting example is {size} bytes; the limit is {limits.max_example_bytes}", None
    problem = _walk_limits(seed, limits)
    if problem:
        return problem, None
    if request.label_field is not None and get_path(seed, request.label_field, _MISSING) is _MISSING:
        return f"label_field {request.label_field!r} is not in the formatting example", None
    try:
        field, space = resolve_label(request)
    except Exception as exc:  # the seed's shape is the user's input: any failure is a rejection
        return f"cannot infer the label of the formatting example: {exc}", None
    if request.label_space is not None:
        if field is None:
            return "label_space is given but no label_field was given or could be inferred", None
        value = get_path(seed, field, _MISSING)
        values = value if isinstance(value, list) else [value]
        if value is _MISSING or any(v not in request.label_space for v in values):
            shown = "nothing" if value is _MISSING else repr(value)[:200]
            return f"the formatting example's label {field!r} is {shown}, not in label_space", None
    try:
        schema = example_schema(seed, field, space, request.allow_extra_keys)
    except Exception as exc:
        return f"formatting example has no usable schema: {exc}", None
    if (unverifiable := _verify_problem(request, field, known_endpoints)) is not None:
        return unverifiable, None
    plan: LabelPlan | None = None
    plannable = bool(field and space) and label_path_in_objects(schema, field or "")
    if request.label_distribution is not None:
        if request.label_plan == "off":
            return "label_distribution needs label_plan \"on\"", None
        if not plannable:
            return "label_distribution needs a known label space (give label_field and label_space)", None
    if request.label_plan == "on" and plannable:
        assert field is not None and space is not None
        try:
            plan = LabelPlan.create(field, space, request.label_distribution, request.target_count)
        except (ValueError, TypeError) as exc:
            return str(exc), None
    return None, ValidatedRequest(request, field, space, schema, plan)


def _verify_problem(request: CreationRequest, field: str | None, known_endpoints: set[str] | None) -> str | None:
    """Label checks need a label to check and a verifier endpoint that exists."""
    if request.verify is VerifyMode.off:
        return None
    if field is None:
        return f"verify={request.verify.value} needs a label: give label_field (none could be inferred from the formatting example)"
    if known_endpoints is not None and request.verify_endpoint is not None and request.verify_endpoint not in known_endpoints:
        return f"unknown verify_endpoint {request.verify_endpoint!r}"
    return None


# ---------------------------------------------------------------------------------------------
# Plan state (everything here goes into a snapshot)


class _State(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Counts(_State):
    accepted: int = 0
    rejected: dict[str, int] = Field(default_factory=dict)
    tasks_issued: int = 0
    llm_calls: int = 0  # outcomes received
    failed_calls: int = 0
    throttled_calls: int = 0  # 429 answers
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    fallbacks: int = 0
    # label checks (verify): verification calls, part of the token and cost totals above
    verify_calls: int = 0
    verify_prompt_tokens: int = 0
    verify_completion_tokens: int = 0
    verify_cost_usd: float = 0.0
    verify_checked: dict[str, int] = Field(default_factory=dict)
    verify_disagreements: dict[str, int] = Field(default_factory=dict)
    verify_unverified: int = 0


class ChainState(_State):
    index: int
    step: int = 0  # number of the chain's next call
    reference: Reference  # formatting example of the chain's latest call
    last_good: Reference  # formatting example of its latest call that yielded accepted examples
    # accepted by the latest call: what its next formatting example is chosen from ("candidates"
    # in snapshots written before the rename, still read)
    choices: list[AcceptedRef] = Field(default_factory=list, validation_alias=AliasChoices("choices", "candidates"))
    pending: bool = False  # the latest call's outcome is in, the next reference not yet chosen


class TreeState(_State):
    level: int = 0  # level whose nodes are being expanded; the seed is level 0
    expansion: int = 0  # level expansions begun so far (restarts included)
    nodes: list[Reference]
    next_node: int = 0
    children: list[AcceptedRef] = Field(default_factory=list)  # the next level, as it comes in


class InFlight(_State):
    task_id: str
    chain: int
    step: int
    references: list[Reference]
    issued_at: float
    expansion: int | None = None  # tree tasks: the expansion they belong to
    labels: list[Any] | None = None  # the label plan's label per item
    issues: int = 1  # times issued (see reissue_overdue); issued_at is the latest


class PlanState(_State):
    version: int = SNAPSHOT_VERSION
    request: CreationRequest
    label_field: str | None = None
    label_space: list[Any] | None = None
    example_schema: dict[str, Any]
    labels: LabelPlan | None = None
    labels_seen: dict[str, int] = Field(default_factory=dict)  # accepted per label with the plan off
    model: str | None = None  # the model that answered, when the request names none
    limits: PlannerLimits = Field(default_factory=PlannerLimits)
    state: RequestState = RequestState.ACCEPTED
    error: str | None = None
    started_at: float
    updated_at: float
    finished_at: float | None = None
    counts: Counts = Field(default_factory=Counts)
    chains: list[ChainState] = Field(default_factory=list)
    tree: TreeState | None = None
    in_flight: dict[str, InFlight] = Field(default_factory=dict)
    pool: list[AcceptedRef] = Field(default_factory=list)
    calls_without_accept: int = 0
    streak_rejected: dict[str, int] = Field(default_factory=dict)
    last_error: str | None = None
    reserved: dict[str, float] = Field(default_factory=dict)  # task id -> worst-case cost (logic.budget)


def accepted_after(accepted: int, outcome: TaskOutcome, target: int) -> int:
    """The request's accepted count once `outcome` is in: the one counter its plan finishes on
    (`accepted >= target`), the curator's count as reported to the plan.

    Each outcome brings the examples it accepted. An outcome whose curator found the target reached
    lifts the count to at least the target: the curator also counts examples the plan never saw,
    restored from the examples topic after a restart or accepted for a task the plan had given up on.
    """
    accepted += len(outcome.accepted)
    return max(accepted, target) if outcome.target_reached else accepted


def task_id_for(request_id: str, *position: object) -> str:
    """Deterministic task id: the same planning step always yields the same id."""
    return hashlib.sha256("\x1f".join(str(part) for part in (request_id, *position)).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# The plan


class RequestPlan:
    """One request's lifecycle. See the module docstring for how a service drives it."""

    def __init__(self, state: PlanState) -> None:
        self._s = state
        self._template: dict[str, Any] | None = None
        self._budget_blocked = False  # the last task to issue did not fit under the budget

    # -- construction and persistence ---------------------------------------------------------

    @classmethod
    def start(cls, validated: ValidatedRequest | CreationRequest, now: float, limits: PlannerLimits | None = None) -> RequestPlan:
        """A new plan; a bare request is validated here (raises `RequestRejected`)."""
        limits = limits or PlannerLimits()
        if isinstance(validated, CreationRequest):
            validated = validate_request(validated, None, limits)
        request = validated.request
        seed = Reference(example_id=None, data=request.formatting_example)
        state = PlanState(
            request=request, label_field=validated.label_field, label_space=validated.label_space,
            example_schema=validated.example_schema, labels=validated.label_plan,
            limits=limits, started_at=now, updated_at=now,
        )
        if request.strategy is Strategy.tree:
            state.tree = TreeState(nodes=[seed])
        else:
            state.chains = [ChainState(index=i, reference=seed, last_good=seed) for i in range(request.chains)]
        return cls(state)

    def snapshot(self) -> dict[str, Any]:
        return self._s.model_dump(mode="json")

    @classmethod
    def restore(cls, snapshot: dict[str, Any]) -> RequestPlan:
        version = snapshot.get("version")
        if version == 1:
            snapshot = _upgrade_v1(snapshot)
        elif version != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported plan snapshot version {version!r}")
        return cls(PlanState.model_validate(snapshot))

    # -- what a service reads -------------------------------------------------------------------

    @property
    def request(self) -> CreationRequest:
        return self._s.request

    @property
    def request_id(self) -> str:
        return self._s.request.request_id

    @property
    def state(self) -> RequestState:
        return self._s.state

    @property
    def counts(self) -> Counts:
        return self._s.counts

    @property
    def error(self) -> str | None:
        return self._s.error

    @property
    def in_flight(self) -> int:
        return len(self._s.in_flight)

    @property
    def finished(self) -> bool:
        return self._s.state.final

    @property
    def wants_tasks(self) -> bool:
        """Whether `next_tasks` would return something now."""
        return not self.finished and self._may_issue() and self._has_work()

    def in_flight_tasks(self) -> list[GenerationTask]:
        """The tasks in flight, rebuilt with their original ids (to publish again after a restore)."""
        return [self._task(entry) for entry in self._s.in_flight.values()]

    def status(self, now: float) -> RequestStatus:
        s, c = self._s, self._s.counts
        end = s.finished_at if s.finished_at is not None else now
        elapsed = end - s.started_at
        return RequestStatus(
            request_id=self.request_id,
            state=s.state,
            target_count=s.request.target_count,
            accepted=c.accepted,
            rejected=dict(c.rejected),
            llm_calls=c.llm_calls,
            failed_calls=c.failed_calls,
            throttled_calls=c.throttled_calls,
            tasks_in_flight=len(s.in_flight),
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            cost_usd=round(c.cost_usd, 10),
            examples_per_second=c.accepted / elapsed if elapsed > 0 else 0.0,
            fallbacks=c.fallbacks,
            strategy=s.request.strategy,
            model=s.request.model.name or s.model,
            temperature=s.request.model.temperature,
            top_p=s.request.model.top_p,
            label_field=s.label_field if s.label_space else None,
            label_counts=dict(sorted(s.labels.accepted.items())) if s.labels else self._label_counts(),
            label_targets=s.labels.target_map() if s.labels else None,
            error=s.error,
            started_at=s.started_at,
            updated_at=now,
            finished_at=s.finished_at,
            **_verify_status(c),
        )

    # -- transitions -----------------------------------------------------------------------------

    def next_tasks(self, now: float, embed: Any = None, max_tasks: int | None = None) -> list[GenerationTask]:
        """Tasks to publish now.

        `embed` (contrastive and similar only) is a `CachedEmbedder`, an `Embedder` or a text
        embedding function like `Embedder.embed`; see `strategies.as_embed_fn`.

        At most `chains` calls are in flight; issuing stops once the calls in flight could make up
        the rest of the target (accepted + in_flight * examples_per_call >= target), and resumes
        as outcomes fall short. Never issues beyond max_llm_calls, nor once cost reaches
        max_cost_usd (counting what the calls in flight are likely to cost).
        """
        if self.finished:
            return []
        embed_fn = as_embed_fn(embed)
        self._budget_blocked = False
        tasks: list[GenerationTask] = []
        while (max_tasks is None or len(tasks) < max_tasks) and self._may_issue():
            entry = self._issue_tree(now) if self._s.tree is not None else self._issue_chain(now, embed_fn)
            if entry is None:
                break
            task = self._task(entry)
            if not self._reserve(entry, task):
                break
            tasks.append(task)
        if tasks and self._s.state is RequestState.ACCEPTED:
            self._s.state = RequestState.RUNNING
        self._s.updated_at = now
        self._check_budget(now)
        return tasks

    def on_outcome(self, outcome: TaskOutcome, now: float) -> None:
        """Fold one task's outcome in. An outcome whose task is not in flight (a redelivery,
        or one from before a restore) changes nothing."""
        s = self._s
        if outcome.request_id != self.request_id:
            return
        entry = s.in_flight.pop(outcome.task_id, None)
        if entry is None:
            return
        s.reserved.pop(outcome.task_id, None)
        self._budget_blocked = False
        s.updated_at = now
        self._account(outcome)
        if outcome.model and s.model is None:
            s.model = outcome.model
        if s.labels is not None:
            s.labels.record(outcome.accepted)
        elif s.label_space:
            self._count_labels(outcome.accepted)
        if entry.expansion is None:
            chain = s.chains[entry.chain]
            chain.choices = list(outcome.accepted)
            chain.pending = True
            if outcome.accepted:
                chain.last_good = entry.references[0]
        else:
            self._collect_children(entry, outcome.accepted)
        if s.request.reference_pool == "all_accepted":
            self._add_to_pool(outcome.accepted)

        if self.finished:
            return  # late outcomes still count their cost, but change no state
        if s.counts.accepted >= s.request.target_count:
            self._finish(RequestState.COMPLETED, None, now)
        elif s.calls_without_accept >= s.limits.stall_calls:
            self._finish(RequestState.FAILED, self._stall_reason(), now)
        else:
            self._check_budget(now)

    def overdue(self, now: float) -> bool:
        """Whether a task in flight has waited past its deadline (see `reissue_overdue`)."""
        deadline = self._s.limits.task_deadline_s
        return not self.finished and any(now - e.issued_at >= deadline for e in self._s.in_flight.values())

    def reissue_overdue(self, now: float) -> tuple[list[GenerationTask], list[TaskOutcome]]:
        """The tasks in flight past their deadline, issued again with the same ids (an outcome of
        any issue answers the task, once). An outcome can be lost on the way (a generator stopped
        mid-call, a curator that could not answer): without this its request would stay RUNNING
        for ever. For a task issued `max_task_issues` times without an outcome, a failed outcome
        instead: published like any other (the status stays the fold of the outcomes topic), it
        frees the task's chain and counts toward the stall limit when it is applied."""
        s = self._s
        deadline, most = s.limits.task_deadline_s, s.limits.max_task_issues
        again: list[GenerationTask] = []
        given_up: list[TaskOutcome] = []
        if self.finished:
            return again, given_up
        for entry in s.in_flight.values():
            if now - entry.issued_at < deadline:
                continue
            entry.issued_at = now  # the task's created_at: a generator tells this issue from a redelivery
            if entry.issues >= most:
                given_up.append(TaskOutcome(
                    task_id=entry.task_id, request_id=self.request_id, chain=entry.chain, step=entry.step,
                    references=entry.references, attempts=0,
                    error=f"no outcome after {entry.issues} issues of the task, {deadline:g} s each"))
                continue
            entry.issues += 1
            again.append(self._task(entry))
        s.updated_at = now
        return again, given_up

    def cancel(self, reason: str, now: float) -> None:
        if not self.finished:
            self._finish(RequestState.CANCELLED, reason, now)

    # -- internals -------------------------------------------------------------------------------

    def _finish(self, state: RequestState, error: str | None, now: float) -> None:
        self._s.state = state
        self._s.error = error
        self._s.finished_at = now
        self._s.updated_at = now

    def _account(self, outcome: TaskOutcome) -> None:
        s, c = self._s, self._s.counts
        c.llm_calls += outcome.attempts
        c.throttled_calls += outcome.throttled
        if outcome.error is not None:
            c.failed_calls += 1
            s.last_error = outcome.error[:500]
        c.prompt_tokens += outcome.usage.prompt_tokens
        c.completion_tokens += outcome.usage.completion_tokens
        c.cost_usd += outcome.cost_usd
        for reason, n in outcome.rejected.items():
            c.rejected[reason] = c.rejected.get(reason, 0) + n
        if outcome.verification is not None:  # label checks: their calls cost like any other
            add_tally(c, outcome.verification)
            c.prompt_tokens += outcome.verification.usage.prompt_tokens
            c.completion_tokens += outcome.verification.usage.completion_tokens
            c.cost_usd += outcome.verification.cost_usd
        c.accepted = accepted_after(c.accepted, outcome, s.request.target_count)
        if outcome.accepted:
            s.calls_without_accept = 0
            s.streak_rejected = {}
        else:
            s.calls_without_accept += 1
            rejected = dict(outcome.rejected)
            if outcome.error is not None and not rejected:
                rejected = {RejectReason.llm_error.value: 1}
            for reason, n in rejected.items():
                s.streak_rejected[reason] = s.streak_rejected.get(reason, 0) + n

    def _stall_reason(self) -> str:
        s = self._s
        text = f"stalled: {s.calls_without_accept} calls in a row gave no new accepted example"
        total = sum(s.streak_rejected.values())
        if total:
            ranked = sorted(s.streak_rejected.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
            text += "; rejections: " + ", ".join(f"{reason} {100 * n / total:.0f}%" for reason, n in ranked)
        if s.last_error and RejectReason.llm_error.value in s.streak_rejected:
            text += f"; last error: {s.last_error}"
        return text

    def _ledger(self) -> BudgetLedger:
        return BudgetLedger(self._s.request, self._s.limits.caps)

    def _budget_allows(self) -> bool:
        s = self._s
        budget = s.request.budget
        # Every HTTP attempt counts; a call in flight makes at least one.
        if budget.max_llm_calls is not None and s.counts.llm_calls + len(s.in_flight) >= budget.max_llm_calls:
            return False
        return not self._ledger().exhausted(s.counts.cost_usd, s.reserved, len(s.in_flight), s.counts.tasks_issued - len(s.in_flight))

    def _reserve(self, entry: InFlight, task: GenerationTask) -> bool:
        """Reserve the task's worst-case cost, or take the task back when it does not fit."""
        s, ledger = self._s, self._ledger()
        amount = ledger.worst_case(task)
        if ledger.fits(s.counts.cost_usd, s.reserved, amount):
            if amount:
                s.reserved[entry.task_id] = amount
            return True
        del s.in_flight[entry.task_id]
        s.counts.tasks_issued -= 1
        if entry.expansion is None:
            s.chains[entry.chain].step -= 1
        else:
            assert s.tree is not None
            s.tree.next_node -= 1
        self._budget_blocked = True
        return False

    def _may_issue(self) -> bool:
        s = self._s
        request = s.request
        if len(s.in_flight) >= request.chains:
            return False
        coming = sum(request.examples_per_call if e.labels is None else len(e.labels) for e in s.in_flight.values())
        if s.counts.accepted + coming >= request.target_count:
            return False
        return self._budget_allows()

    def _has_work(self) -> bool:
        tree = self._s.tree
        if tree is None:
            return len(self._s.in_flight) < len(self._s.chains)  # one call in flight per chain
        return tree.next_node < len(tree.nodes) or not self._expansion_busy(tree.expansion)

    def _check_budget(self, now: float) -> None:
        s = self._s
        if self.finished or s.in_flight or s.counts.accepted >= s.request.target_count:
            return
        if self._budget_blocked or not self._budget_allows():
            spent = s.counts
            self._finish(
                RequestState.BUDGET_EXHAUSTED,
                f"budget spent after {spent.llm_calls} calls ({spent.tasks_issued} tasks) and ${spent.cost_usd:.4f}: "
                f"{spent.accepted} of {s.request.target_count} examples made",
                now,
            )

    # chains

    def _issue_chain(self, now: float, embed: EmbedFn | None) -> InFlight | None:
        s = self._s
        busy = {entry.chain for entry in s.in_flight.values()}
        free = [chain for chain in s.chains if chain.index not in busy]
        if not free:
            return None
        chain = min(free, key=lambda c: (c.step, c.index))  # keep chains at an even pace
        labels = self._plan_labels("chain", chain.index, chain.step)
        if chain.pending:
            chain.reference = self._choose(chain, embed, labels[0] if labels else None)
            chain.choices = []
            chain.pending = False
        entry = InFlight(
            task_id=task_id_for(self.request_id, chain.index, chain.step),
            chain=chain.index,
            step=chain.step,
            references=[chain.reference],
            issued_at=now,
            labels=labels,
        )
        chain.step += 1
        s.in_flight[entry.task_id] = entry
        s.counts.tasks_issued += 1
        return entry

    def _choose(self, chain: ChainState, embed: EmbedFn | None, label: Any = None) -> Reference:
        s = self._s
        request = s.request
        if request.strategy is Strategy.none:
            return Reference(example_id=None, data=request.formatting_example)
        choices = s.pool if request.reference_pool == "all_accepted" else chain.choices
        if s.labels is not None and label is not None:
            # Label-aware self-reference: an example of the label this call needs most, so the
            # formatting example's own label stops pulling every call toward one label.
            choices = s.labels.references_for(label, choices) or choices
        if not choices:
            s.counts.fallbacks += 1
            return chain.last_good
        rng = derive_rng(self.request_id, "choose", chain.index, chain.step)
        chosen = select_reference(request.strategy, chain.reference, choices, rng, embed)
        return Reference(example_id=chosen.example_id, data=chosen.data)

    def _plan_labels(self, *position: object) -> list[Any] | None:
        s = self._s
        if s.labels is None:
            return None
        pending = [label for e in s.in_flight.values() for label in (e.labels or ())]
        rng = derive_rng(self.request_id, "labels", *position)
        return s.labels.plan_call(s.request.examples_per_call, pending, rng) or None

    def _count_labels(self, accepted: list[AcceptedRef]) -> None:
        """Label counts with the plan off (kept in `labels_seen`)."""
        field = self._s.label_field
        assert field is not None
        for item in accepted:
            text = label_of(item.data, field)
            if text is not None:
                self._s.labels_seen[text] = self._s.labels_seen.get(text, 0) + 1

    def _label_counts(self) -> dict[str, int]:
        return dict(sorted(self._s.labels_seen.items()))

    def _add_to_pool(self, accepted: list[AcceptedRef]) -> None:
        s = self._s
        seen = s.counts.accepted - len(accepted)
        for item in accepted:
            seen += 1
            if len(s.pool) < s.limits.pool_size:
                s.pool.append(item)
            else:
                # Reservoir sampling keeps a uniform sample of every accepted example.
                slot = derive_rng(self.request_id, "pool", seen).randrange(seen)
                if slot < s.limits.pool_size:
                    s.pool[slot] = item

    # tree

    def _expansion_busy(self, expansion: int) -> bool:
        return any(entry.expansion == expansion for entry in self._s.in_flight.values())

    def _collect_children(self, entry: InFlight, accepted: list[AcceptedRef]) -> None:
        s = self._s
        tree = s.tree
        assert tree is not None
        if entry.expansion != tree.expansion:
            return
        room = s.limits.max_tree_level_nodes - len(tree.children)
        if room > 0:
            tree.children.extend(tree_children(accepted, min(s.request.tree_branching, room)))
        self._advance_level()

    def _advance_level(self) -> None:
        """Start the next expansion once the current level is complete."""
        s = self._s
        tree = s.tree
        assert tree is not None
        if tree.next_node < len(tree.nodes) or self._expansion_busy(tree.expansion):
            return
        tree.expansion += 1
        rng = derive_rng(self.request_id, "tree", tree.expansion)
        if tree.children:
            tree.level += 1
            tree.nodes = shuffled([Reference(example_id=c.example_id, data=c.data) for c in tree.children], rng)
        else:
            # The tree died out: expand the last non-empty level again.
            s.counts.fallbacks += 1
            tree.nodes = shuffled(tree.nodes, rng)
        tree.children = []
        tree.next_node = 0

    def _issue_tree(self, now: float) -> InFlight | None:
        s = self._s
        tree = s.tree
        assert tree is not None
        if tree.next_node >= len(tree.nodes):
            self._advance_level()
            if tree.next_node >= len(tree.nodes):
                return None  # the level's last calls are still out
        node = tree.nodes[tree.next_node]
        entry = InFlight(
            task_id=task_id_for(self.request_id, "tree", tree.expansion, tree.next_node),
            chain=tree.next_node,
            step=tree.level + 1,
            references=[node],
            issued_at=now,
            expansion=tree.expansion,
            labels=self._plan_labels("tree", tree.expansion, tree.next_node),
        )
        tree.next_node += 1
        s.in_flight[entry.task_id] = entry
        s.counts.tasks_issued += 1
        return entry

    # tasks

    def _task_template(self) -> dict[str, Any]:
        if self._template is None:
            s = self._s
            request = s.request
            self._template = {
                "request_id": request.request_id,
                "strategy": request.strategy,
                "instruction": request.instruction,
                "target_count": request.target_count,
                "example_schema": s.example_schema,
                "label_field": s.label_field,
                "label_space": s.label_space,
                "model": request.model,
                "allow_extra_keys": request.allow_extra_keys,
                "dedup": request.dedup,
                "verify": request.verify,  # label checks
                "verify_endpoint": request.verify_endpoint,
            }
        return self._template

    def _task(self, entry: InFlight) -> GenerationTask:
        return GenerationTask(
            task_id=entry.task_id,
            chain=entry.chain,
            step=entry.step,
            references=entry.references,
            num_examples=len(entry.labels) if entry.labels else self._s.request.examples_per_call,
            planned_labels=entry.labels,
            created_at=entry.issued_at,
            **self._task_template(),
        )


def _upgrade_v1(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A version 1 snapshot (no label or schema of its own): work them out once, plan off for it.

    Its accepted examples were not counted per label, so a plan started now would plan from zero.
    """
    request = CreationRequest.model_validate(snapshot["request"])
    request = request.model_copy(update={"label_plan": "off", "label_distribution": None})
    _, validated = _validate(request, None, PlannerLimits.model_validate(snapshot.get("limits") or {}))
    if validated is None:
        raise ValueError("plan snapshot version 1 holds a request that no longer validates")
    return {
        **snapshot,
        "version": SNAPSHOT_VERSION,
        "request": request.model_dump(mode="json"),
        "label_field": validated.label_field,
        "label_space": validated.label_space,
        "example_schema": validated.example_schema,
    }


def _verify_status(c: Counts) -> dict[str, Any]:
    return {
        "verify_calls": c.verify_calls, "verify_prompt_tokens": c.verify_prompt_tokens,
        "verify_completion_tokens": c.verify_completion_tokens, "verify_cost_usd": round(c.verify_cost_usd, 10),
        "verify_checked": dict(c.verify_checked), "verify_disagreements": dict(c.verify_disagreements),
        "verify_unverified": c.verify_unverified,
    }

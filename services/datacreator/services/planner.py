"""Planner: owns each request's lifecycle; turns requests and task outcomes into the next tasks.

Requests and outcomes are both keyed by request_id and have the same partition count, and the
range assignor gives the same partition numbers of both topics to one member, so every message of
a request reaches the same planner. After each step the planner writes a snapshot of the request's
plan to a compacted topic before the input offset is committed; a planner that takes over the
partitions (after a crash or a rebalance) restores those snapshots and carries on where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

from datacreator import metrics
from datacreator.bus.codec import PoisonMessage, request_id_of
from datacreator.bus.readback import read_models
from datacreator.bus.runtime import BaseHandler, Context, Delivery, Output
from datacreator.config import Settings
from datacreator.contracts import (
    CancelRequest,
    CreationRequest,
    PlannerSnapshot,
    RequestMessage,
    RequestState,
    RequestStatus,
    TaskOutcome,
)
from datacreator.logic.embeddings import Embedder, shared_embedder
from datacreator.logic.planning import PlannerLimits, RequestPlan, RequestRejected, validate_request
from datacreator.logic.strategies import needs_embeddings

log = logging.getLogger(__name__)


class PlannerHandler(BaseHandler):
    name = "planner"
    ordered = True

    def __init__(self, settings: Settings, embedder: Embedder | None = None, limits: PlannerLimits | None = None) -> None:
        self.settings = settings
        self.inputs = {settings.topics.requests: RequestMessage, settings.topics.outcomes: TaskOutcome}
        self.limits = limits or PlannerLimits(stall_calls=settings.stall_calls, caps=settings.operator_caps(),
                                              **({"max_target_count": settings.max_target_count} if settings.max_target_count else {}))
        self._embedder = embedder
        self.plans: dict[str, RequestPlan] = {}
        self.partition_of: dict[str, int] = {}
        self._last_status: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._deadlines: asyncio.Task[None] | None = None
        self._overdue: set[str] = set()  # requests with a deadline step queued on their partition

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = shared_embedder()
        return self._embedder

    async def start(self, ctx: Context) -> None:
        await super().start(ctx)
        self._ticker = asyncio.create_task(self._flush_statuses(), name="planner-status")
        self._deadlines = asyncio.create_task(self._watch_deadlines(), name="planner-deadlines")

    async def stop(self) -> None:
        for task in (self._ticker, self._deadlines):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- partitions -------------------------------------------------------------------------

    async def on_assigned(self, partitions: set[int]) -> None:
        held = set(self.partition_of.values())
        numbers = sorted(partitions - held)
        if not numbers:
            return
        latest: dict[str, tuple[int, PlannerSnapshot]] = {}
        # complete=True: a read that stops short fails the take-over (the runner retries it); a
        # missing snapshot would drop its request's outcomes and leave it RUNNING for ever.
        async for partition, snapshot in read_models(self.settings, self.settings.topics.planner_state, PlannerSnapshot,
                                                     numbers, complete=True):
            latest[snapshot.request_id] = (partition, snapshot)
        resent: list[Output] = []
        for request_id, (partition, snapshot) in latest.items():
            plan = self.plans[request_id] = RequestPlan.restore(snapshot.plan)
            self.partition_of[request_id] = partition
            if not plan.state.final:
                # A crash may have come between the snapshot and its tasks: send them again (same
                # ids, so a task that did go out is answered once and its outcome applied once).
                resent += [Output(self.settings.topics.tasks, request_id, task) for task in plan.in_flight_tasks()]
        if latest:
            log.info("planner: resumed %d requests from partitions %s", len(latest), numbers)
        if resent:
            await self.ctx.publish(resent)
        self._update_gauges()

    async def on_revoked(self, partitions: set[int]) -> None:
        for request_id, partition in list(self.partition_of.items()):
            if partition in partitions:
                self.plans.pop(request_id, None)
                self._dirty.discard(request_id)
                del self.partition_of[request_id]
        self._update_gauges()

    # -- messages ---------------------------------------------------------------------------

    async def handle(self, message: CreationRequest | CancelRequest | TaskOutcome, delivery: Delivery) -> list[Output]:
        if isinstance(message, TaskOutcome):
            return await self._on_outcome(message)
        if isinstance(message, CancelRequest):
            return self._on_cancel(message)
        return await self._on_create(message, delivery)

    def on_poison(self, delivery: Delivery, error: PoisonMessage) -> list[Output]:
        """A request that does not decode is answered REJECTED when its id can be read."""
        if self.inputs.get(delivery.topic) is not RequestMessage:
            return []
        request_id = request_id_of(delivery.value, delivery.key)
        if request_id is None or request_id in self.plans:
            return []
        return [self._rejected(request_id, str(error), time.time())]

    async def _on_outcome(self, outcome: TaskOutcome) -> list[Output]:
        plan = self.plans.get(outcome.request_id)
        if plan is None:
            return []
        now = time.time()
        was = plan.state
        plan.on_outcome(outcome, now)
        if was.final:  # a call that was under way when the request ended: its cost still counts
            return self._step_outputs(plan, [], now, force_status=False)
        tasks = await self._next_tasks(plan, now)
        return self._step_outputs(plan, tasks, now, force_status=plan.state != was)

    def _on_cancel(self, message: CancelRequest) -> list[Output]:
        now = time.time()
        plan = self.plans.get(message.request_id)
        if plan is None or plan.state.final:
            return []
        plan.cancel(message.reason, now)
        return self._step_outputs(plan, [], now, force_status=True)

    async def _on_create(self, message: CreationRequest, delivery: Delivery) -> list[Output]:
        now = time.time()
        if message.request_id in self.plans:
            return []  # a redelivery: the request is under way or done already
        active = sum(1 for p in self.plans.values() if not p.state.final)
        try:
            validated, reason = validate_request(message, set(self.settings.endpoints) | {"default"}, self.limits), None
        except RequestRejected as exc:
            validated, reason = None, str(exc)
        if reason is None and active >= self.settings.max_active_requests:
            reason = f"too many active requests ({active}); the limit is {self.settings.max_active_requests}"
        if reason is not None:
            return [self._rejected(message.request_id, reason, now, message)]
        assert validated is not None
        plan = RequestPlan.start(validated, now, self.limits)
        self.plans[message.request_id] = plan
        self.partition_of[message.request_id] = delivery.partition
        tasks = await self._next_tasks(plan, now)
        self._update_gauges()
        return self._step_outputs(plan, tasks, now, force_status=True)

    async def _next_tasks(self, plan: RequestPlan, now: float) -> list:
        if needs_embeddings(plan.request.strategy):
            # Embeddings are CPU-bound: keep them off the event loop.
            return await asyncio.to_thread(plan.next_tasks, now, self.embedder.embed)
        return plan.next_tasks(now)

    def _step_outputs(self, plan: RequestPlan, tasks: list, now: float, force_status: bool) -> list[Output]:
        topics = self.settings.topics
        request_id = plan.request.request_id
        outputs = [Output(topics.tasks, request_id, task) for task in tasks]
        for _ in tasks:
            metrics.tasks_planned.labels(plan.request.strategy.value).inc()
        outputs.append(Output(topics.planner_state, request_id, PlannerSnapshot(request_id=request_id, plan=plan.snapshot())))
        if force_status or now - self._last_status.get(request_id, 0.0) >= self.settings.status_interval_s:
            outputs.append(Output(topics.status, request_id, plan.status(now)))
            self._last_status[request_id] = now
            self._dirty.discard(request_id)
            if force_status and plan.state.final:
                metrics.requests_total.labels(plan.state.value).inc()
                self._update_gauges()
        else:
            self._dirty.add(request_id)
        return outputs

    async def _watch_deadlines(self) -> None:
        """Requests with a task past its deadline get a step on their partition's worker (one
        writer per request, as for its messages), which issues those tasks again."""
        interval = min(max(self.limits.task_deadline_s / 4, 0.1), 30.0)
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for request_id, plan in list(self.plans.items()):
                partition = self.partition_of.get(request_id)
                if request_id in self._overdue or partition is None or not plan.overdue(now):
                    continue
                job = functools.partial(self._on_deadline, request_id)
                if self.ctx.submit(self.settings.topics.outcomes, partition, job):
                    self._overdue.add(request_id)

    async def _on_deadline(self, request_id: str) -> list[Output]:
        self._overdue.discard(request_id)
        plan = self.plans.get(request_id)
        now = time.time()
        if plan is None or not plan.overdue(now):
            return []
        again, given_up = plan.reissue_overdue(now)
        if again or given_up:
            log.warning("planner: %s: %d tasks without an outcome past %g s; %d issued again, %d given up", request_id,
                        len(again) + len(given_up), self.limits.task_deadline_s, len(again), len(given_up))
        outputs = self._step_outputs(plan, again, now, force_status=False)
        # Applied when read back from the outcomes topic, like a generator's failed call.
        return outputs + [Output(self.settings.topics.outcomes, request_id, outcome) for outcome in given_up]

    def _rejected(self, request_id: str, reason: str, now: float, request: CreationRequest | None = None) -> Output:
        metrics.requests_total.labels(RequestState.REJECTED.value).inc()
        status = RequestStatus(
            request_id=request_id,
            state=RequestState.REJECTED,
            target_count=request.target_count if request else 0,
            strategy=request.strategy if request else None,
            error=reason,
            finished_at=now,
        )
        return Output(self.settings.topics.status, request_id, status)

    async def _flush_statuses(self) -> None:
        """Statuses held back by the rate bound are published here, so the last one is never lost."""
        while True:
            await asyncio.sleep(self.settings.status_interval_s)
            now = time.time()
            pending = [rid for rid in list(self._dirty) if rid in self.plans]
            self._dirty.clear()
            if pending:
                outputs = [Output(self.settings.topics.status, rid, self.plans[rid].status(now)) for rid in pending]
                for rid in pending:
                    self._last_status[rid] = now
                with contextlib.suppress(Exception):
                    await self.ctx.publish(outputs)

    def _update_gauges(self) -> None:
        counts: dict[str, int] = {state.value: 0 for state in RequestState}
        for plan in self.plans.values():
            counts[plan.state.value] += 1
        for state, count in counts.items():
            metrics.requests_by_state.labels(state).set(count)

"""Planner: owns each request's lifecycle; turns requests and task outcomes into the next tasks.

Requests and outcomes are both keyed by request_id and have the same partition count, and the
range assignor gives the same partition numbers of both topics to one member, so every message of
a request reaches the same planner. After each step the planner writes a snapshot of the request's
plan to a compacted topic before the input offset is committed; a planner that takes over the
partitions (after a crash or a rebalance) restores those snapshots and carries on where it was.

Compaction keeps a key's record of highest offset, so every write of one request (snapshot and
status) happens under the runner's lock of its key (`Context.key_lock`): one step at a time,
acknowledged before the next, so the highest offset is always the newest state. Each write
carries the request's next version, and readers keep the highest version, never the last record.
A finished request's snapshot is deleted with a tombstone after `snapshot_retention_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

from datacreator import metrics
from datacreator.bus.codec import PoisonMessage, decode, request_id_of
from datacreator.bus.readback import end_offsets, read_to_end
from datacreator.bus.runtime import BaseHandler, Context, Deferred, Delivery, Output
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
from datacreator.logic.embeddings import Embedder
from datacreator.logic.planning import PlannerLimits, RequestPlan, RequestRejected, validate_request
from datacreator.logic.retention import ReleaseClock
from datacreator.logic.strategies import needs_embeddings
from datacreator.logic.validation import snapshot_size_problem
from datacreator.minilm import shared_embedder

log = logging.getLogger(__name__)


class PlannerHandler(BaseHandler):
    name = "planner"
    ordered = True

    def __init__(self, settings: Settings, embedder: Embedder | None = None, limits: PlannerLimits | None = None) -> None:
        self.settings = settings
        self.inputs = {settings.topics.requests: RequestMessage, settings.topics.outcomes: TaskOutcome}
        self.limits = limits or PlannerLimits(stall_calls=settings.planner.stall_calls, caps=settings.operator_caps(),
                                              **({"max_target_count": settings.planner.max_target_count} if settings.planner.max_target_count else {}))
        self._embedder = embedder
        self.plans: dict[str, RequestPlan] = {}
        self.partition_of: dict[str, int] = {}
        self._last_status: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._ended = ReleaseClock(settings.runtime.final_state_ttl_s)  # ended plans go after their hold
        self._releaser: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.versions: dict[str, int] = {}  # request id -> version of its last snapshot written
        self._finished_at: dict[str, float] = {}  # final requests -> when they became final
        # partitions given up in a rebalance, kept until the next assignment says whether they stay:
        # partition -> (end offset of its planner-state partition then, {request id: plan})
        self._parked: dict[int, tuple[int, dict[str, RequestPlan]]] = {}
        self._whole: set[int] = set()  # partitions whose snapshots were read back whole
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
        self._releaser = asyncio.create_task(self._release_loop(), name="planner-release")
        self._deadlines = asyncio.create_task(self._watch_deadlines(), name="planner-deadlines")

    async def stop(self) -> None:
        for task in (self._ticker, self._releaser, self._deadlines):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- partitions -------------------------------------------------------------------------

    async def on_assigned(self, partitions: set[int]) -> None:
        kept = await self._unpark(partitions)
        self._whole |= kept
        held = set(self.partition_of.values()) | kept
        numbers = sorted(partitions - held)
        if not numbers:
            self._update_gauges()
            return
        latest = await self._read_snapshots(numbers)
        self._whole.update(numbers)
        resent: list[Output] = []
        for request_id, (partition, snapshot) in latest.items():
            plan = self.plans[request_id] = RequestPlan.restore(snapshot.plan)
            self.partition_of[request_id] = partition
            self.versions[request_id] = snapshot.version
            if plan.state.final:
                self._finished_at[request_id] = float(snapshot.plan.get("finished_at") or time.time())
            if not plan.state.final:
                # A crash may have come between the snapshot and its tasks: send them again (same
                # ids, so a task that did go out is answered once and its outcome applied once).
                resent += [Output(self.settings.topics.tasks, request_id, task) for task in plan.in_flight_tasks()]
        self._hold_restored(list(latest))
        if latest:
            log.info("planner: resumed %d requests from partitions %s", len(latest), numbers)
        if resent:
            await self.ctx.publish(resent)
        self._update_gauges()

    async def _read_snapshots(self, numbers: list[int]) -> dict[str, tuple[int, PlannerSnapshot]]:
        """The snapshot of highest version of each request on some partitions; a request whose
        last record is a tombstone is left out. Records are read as they are, all of them:
        before compaction both an old and a new snapshot of a request are there."""
        latest: dict[str, tuple[int, PlannerSnapshot]] = {}
        # complete=True: a read that stops short fails the take-over (the runner retries it); a
        # missing snapshot would drop its request's outcomes and leave it RUNNING for ever.
        async for record in read_to_end(self.settings, self.settings.topics.planner_state, numbers, complete=True):
            key = record.key.decode("utf-8", "replace") if record.key is not None else None
            if record.value is None:
                if key is not None:
                    latest.pop(key, None)
                    self._ended.release(key, RequestState.COMPLETED)  # deleted: a redelivery starts nothing
                continue
            try:
                snapshot = decode(PlannerSnapshot, record.value)
            except PoisonMessage:
                continue
            previous = latest.get(snapshot.request_id)
            if previous is None or snapshot.version >= previous[1].version:
                latest[snapshot.request_id] = (record.partition, snapshot)
        return latest

    async def on_revoked(self, partitions: set[int]) -> None:
        lost: dict[str, tuple[int, RequestPlan | None]] = {}
        for request_id, partition in list(self.partition_of.items()):
            if partition in partitions:
                lost[request_id] = (partition, self.plans.pop(request_id, None))
                self._dirty.discard(request_id)
                self._last_status.pop(request_id, None)
                del self.partition_of[request_id]
        self._update_gauges()
        key_lock = getattr(getattr(self, "ctx", None), "key_lock", None)
        if key_lock is not None:
            for request_id in lost:
                async with key_lock(request_id):  # a status the ticker is writing lands before the next owner's
                    pass
        # Parked, not dropped: with eager rebalancing every partition is revoked, and most come back.
        # Only partitions whose state was whole: one whose take-over failed has nothing to keep.
        whole = partitions & self._whole
        self._whole -= partitions
        ends = await end_offsets(self.settings, self.settings.topics.planner_state, whole) if whole else None
        if ends is not None:
            for partition in whole & set(ends):
                self._parked[partition] = (ends[partition], {})
        for request_id, (partition, plan) in lost.items():
            if plan is not None and partition in self._parked:
                self._parked[partition][1][request_id] = plan
            else:
                self._drop_meta(request_id)

    async def _unpark(self, partitions: set[int]) -> set[int]:
        """Take back the parked plans of partitions assigned again that no one wrote to meanwhile
        (the planner-state partition ends where it ended when it was revoked); the partitions kept."""
        parked, self._parked = self._parked, {}
        back = {p: v for p, v in parked.items() if p in partitions}
        for partition, (_, plans) in parked.items():
            if partition not in back:
                for request_id in plans:
                    self._drop_meta(request_id)
        ends = await end_offsets(self.settings, self.settings.topics.planner_state, back) if back else {}
        kept: set[int] = set()
        for partition, (end, plans) in back.items():
            if ends is not None and ends.get(partition) == end:
                kept.add(partition)
                for request_id, plan in plans.items():
                    self.plans[request_id] = plan
                    self.partition_of[request_id] = partition
            else:
                for request_id in plans:
                    self._drop_meta(request_id)
        if kept:
            log.info("planner: kept the state of partitions %s across the rebalance", sorted(kept))
        return kept

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
        if request_id is None or request_id in self.plans or self._ended.released(request_id) is not None:
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
        if self._ended.released(message.request_id) is not None:
            return []  # the same, for a request that ended and was let go
        active = sum(1 for p in self.plans.values() if not p.state.final)
        try:
            validated, reason = validate_request(message, set(self.settings.endpoints) | {"default"}, self.limits), None
        except RequestRejected as exc:
            validated, reason = None, str(exc)
        if reason is None and active >= self.settings.planner.max_active_requests:
            reason = f"too many active requests ({active}); the limit is {self.settings.planner.max_active_requests}"
        if reason is None:
            assert validated is not None
            reason = snapshot_size_problem(message, validated.example_schema, max_bytes=self.settings.kafka.max_message_bytes,
                                           pool_size=self.limits.pool_size, tree_level_nodes=self.limits.max_tree_level_nodes)
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
        # Called under the key's lock (the runner's, for the input being handled): versions follow
        # the order the writes are acknowledged in.
        version = self.versions[request_id] = self.versions.get(request_id, 0) + 1
        if plan.state.final:
            self._finished_at.setdefault(request_id, now)
        # Newest wins (HOLD_S), so the plan is written when its snapshot is sent, as it is then: of
        # the steps a flush covers only the last one's is built (a plan of 64 chains is ~70 KB of JSON).
        snapshot = Deferred(PlannerSnapshot, functools.partial(self._snapshot, plan, version))
        outputs.append(Output(topics.planner_state, request_id, snapshot, latest=True))
        if force_status or now - self._last_status.get(request_id, 0.0) >= self.settings.planner.status_interval_s:
            outputs.append(Output(topics.status, request_id, self._status(plan, now)))
            self._last_status[request_id] = now
            self._dirty.discard(request_id)
            if force_status and plan.state.final:
                self._ended.ended(request_id, now, plan.state)
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
        # The request's lock is held until its outputs are acknowledged, as for its messages: a
        # cancel (on the requests partition's worker) must not write a snapshot in between.
        async with self.ctx.key_lock(request_id):
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
            await self.ctx.publish(outputs + [Output(self.settings.topics.outcomes, request_id, outcome) for outcome in given_up])
        return []

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

    def _snapshot(self, plan: RequestPlan, version: int) -> PlannerSnapshot:
        """The plan as it is now, with the version of its latest step (the one it was made at, if
        the planner has let the request go since)."""
        request_id = plan.request_id
        return PlannerSnapshot(request_id=request_id, plan=plan.snapshot(), version=self.versions.get(request_id, version))

    def _status(self, plan: RequestPlan, now: float) -> RequestStatus:
        status = plan.status(now)
        status.version = self.versions.get(plan.request_id, 0)
        return status

    async def _flush_statuses(self) -> None:
        """Statuses held back by the rate bound are published here, so the last one is never lost;
        and finished requests' snapshots are deleted once they are older than the retention."""
        while True:
            await asyncio.sleep(self.settings.planner.status_interval_s)
            await self._flush_once()

    async def _flush_once(self) -> None:
        now = time.time()
        # One release for a finished plan: its snapshot's tombstone and the plan going from memory
        # happen together, at the earlier of the two holds.
        retention = min(self.settings.planner.snapshot_retention_s, self.settings.runtime.final_state_ttl_s)
        expired = [rid for rid, at in self._finished_at.items() if rid in self.plans and now - at >= retention]
        pending = [rid for rid in self._dirty if rid in self.plans]
        held: list[asyncio.Lock] = []
        outputs: list[Output] = []
        try:
            for rid in dict.fromkeys(pending + expired):
                lock = self.ctx.key_lock(rid)
                if lock.locked():
                    continue  # a step of it is being handled or written: it writes the status
                await lock.acquire()  # free: taken at once
                held.append(lock)
                plan = self.plans.get(rid)
                if plan is None:
                    continue
                if rid in self._dirty:
                    self._dirty.discard(rid)
                    self._last_status[rid] = now
                    outputs.append(Output(self.settings.topics.status, rid, self._status(plan, now)))
                if rid in expired:
                    outputs.append(Output(self.settings.topics.planner_state, rid, None))
            if outputs:
                with contextlib.suppress(Exception):
                    await self.ctx.publish(outputs)
                    for output in outputs:
                        if output.value is None:
                            self._forget(output.key or "")
        finally:
            for lock in held:
                lock.release()

    def _drop_meta(self, request_id: str) -> None:
        self.versions.pop(request_id, None)
        self._finished_at.pop(request_id, None)

    def _forget(self, request_id: str) -> None:
        """A finished request past its retention: its snapshot is deleted, the planner lets it go
        (and remembers its id, a bounded number of them, so that a redelivery starts nothing)."""
        plan = self.plans.pop(request_id, None)
        self._ended.release(request_id, plan.state if plan is not None else RequestState.COMPLETED)
        self.partition_of.pop(request_id, None)
        self.versions.pop(request_id, None)
        self._finished_at.pop(request_id, None)
        self._last_status.pop(request_id, None)
        self._dirty.discard(request_id)
        self._update_gauges()

    def _hold_restored(self, request_ids: list[str]) -> None:
        """Ended requests read back start their hold from when they ended; those past it go at once."""
        now = time.time()
        for request_id in request_ids:
            plan = self.plans.get(request_id)
            if plan is not None and plan.state.final:
                self._ended.ended(request_id, plan.status(now).finished_at or now, plan.state)
        self.release_due(now)

    async def _release_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.planner.status_interval_s)
            self.release_due(time.time())

    def release_due(self, now: float) -> int:
        """Drop the plans of requests whose hold after their end has passed; how many went."""
        gone = self._ended.due(now)
        for request_id in gone:
            if request_id in self._finished_at and request_id in self.plans:
                continue  # its tombstone is written first (_flush_once), then it is forgotten
            self.plans.pop(request_id, None)
            self.partition_of.pop(request_id, None)
            self._last_status.pop(request_id, None)
            self._dirty.discard(request_id)
        if gone:
            self._update_gauges()
        return len(gone)

    def _update_gauges(self) -> None:
        counts: dict[str, int] = {state.value: 0 for state in RequestState}
        for plan in self.plans.values():
            counts[plan.state.value] += 1
        for state, count in counts.items():
            metrics.requests_by_state.labels(state).set(count)

"""Curator: parse, validate and de-duplicate candidates; publish examples, rejections and task outcomes.

One request's candidates, examples and outcomes share a partition number (all keyed by request_id,
same partition count), so its dedup state lives in one curator, and after a rebalance or a crash
that curator rebuilds it by reading back the examples already published on its partitions.
"""

from __future__ import annotations

import asyncio
import logging

from datacreator import metrics
from datacreator.bus.readback import StatusWatcher, read_models
from datacreator.bus.runtime import BaseHandler, Context, Delivery, Output
from datacreator.config import Settings
from datacreator.contracts import Candidate, Example, Rejection, RejectReason, RequestState, RequestStatus, TaskOutcome
from datacreator.logic.curation import CuratorState
from datacreator.logic.embeddings import Embedder, shared_embedder

log = logging.getLogger(__name__)


class CuratorHandler(BaseHandler):
    name = "curator"
    ordered = True

    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.inputs = {settings.topics.candidates: Candidate}
        self.state = CuratorState(
            max_field_chars=settings.max_field_chars,
            raw_text_limit=settings.raw_text_limit,
            num_perm=settings.minhash_num_perm,
            embedder=embedder,
            embedder_factory=shared_embedder,
        )
        self._held: set[int] = set()  # candidate partitions whose published examples are loaded
        self.status = StatusWatcher(settings, on_status=self._forget_if_final)
        self.status.release_after(settings.final_state_ttl_s)  # ended requests' statuses go after their hold

    async def start(self, ctx: Context) -> None:
        await super().start(ctx)
        await self.status.start()

    async def stop(self) -> None:
        await self.status.stop()

    async def on_assigned(self, partitions: set[int]) -> None:
        numbers = sorted(partitions - self._held)
        if not numbers:
            return
        self._held.update(numbers)
        count = 0
        async for partition, example in read_models(self.settings, self.settings.topics.examples, Example, numbers):
            if self.status.is_closed(example.request_id):
                continue  # an ended request needs no dedup state
            self.state.restore(example, partition)
            count += 1
        if count:
            log.info("curator: restored %d published examples from partitions %s", count, numbers)
        self._update_gauges()

    async def on_revoked(self, partitions: set[int]) -> None:
        self._held -= partitions
        self.state.forget_partitions(partitions)
        self._update_gauges()

    async def handle(self, candidate: Candidate, delivery: Delivery) -> list[Output]:
        topics = self.settings.topics
        request_id = candidate.task.request_id
        if (released := self.status.released_state(request_id)) is not None:
            return self._closed(candidate, released)  # ended long ago: its status is no longer held
        status = self.status.latest.get(request_id)
        if status is not None and status.state.final and (
            status.state != RequestState.COMPLETED or request_id not in self.state.requests
        ):
            return self._closed(candidate, status.state)
        # Large answers (parsing, validation, semantic-dedup embeddings) are curated off the event loop.
        if len(candidate.raw_output or "") > 16_384 or candidate.task.dedup.semantic_threshold is not None:
            result = await asyncio.to_thread(self.state.curate, candidate, delivery.partition)
        else:
            result = self.state.curate(candidate, delivery.partition)
        outputs = [Output(topics.examples, request_id, e) for e in result.examples]
        outputs += [Output(topics.rejected, request_id, r) for r in result.rejections]
        outputs.append(Output(topics.outcomes, request_id, result.outcome))
        metrics.examples_accepted.inc(len(result.examples))
        for rejection in result.rejections:
            metrics.examples_rejected.labels(rejection.reason.value).inc()
        metrics.observe_verification(result.outcome.verification if result.outcome else None)  # label checks
        self._update_gauges()
        return outputs

    def _forget_if_final(self, status: RequestStatus) -> None:
        """A request that has ended needs no dedup state; late candidates are answered from its status."""
        if status.state.final:
            self.state.forget(status.request_id)
            self._update_gauges()

    def _closed(self, candidate: Candidate, state: RequestState) -> list[Output]:
        task = candidate.task
        rejection = Rejection(request_id=task.request_id, task_id=task.task_id, reason=RejectReason.request_closed,
                              detail=f"request is {state.value}")
        outcome = TaskOutcome(task_id=task.task_id, request_id=task.request_id, chain=task.chain, step=task.step,
                              references=task.references, rejected={RejectReason.request_closed.value: 1},
                              usage=candidate.usage, cost_usd=candidate.cost_usd, latency_s=candidate.latency_s,
                              attempts=candidate.attempts)
        metrics.examples_rejected.labels(RejectReason.request_closed.value).inc()
        topics = self.settings.topics
        return [Output(topics.rejected, task.request_id, rejection), Output(topics.outcomes, task.request_id, outcome)]

    def _update_gauges(self) -> None:
        metrics.dedup_requests.set(len(self.state.requests))
        metrics.dedup_state_entries.set(self.state.state_size())

"""Curator: parse, validate and de-duplicate candidates; publish examples, rejections and task outcomes.

One request's candidates, examples and outcomes share a partition number (all keyed by request_id,
same partition count), so its dedup state lives in one curator, and after a rebalance or a crash
that curator rebuilds it by reading back the examples already published on its partitions.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import ConsumerRecord

from datacreator import metrics
from datacreator.bus.codec import PoisonMessage, decode
from datacreator.bus.readback import StatusWatcher, read_to_end
from datacreator.bus.runtime import BaseHandler, Context, Output
from datacreator.config import Settings
from datacreator.contracts import Candidate, Example, RejectReason, Rejection, RequestState, RequestStatus, TaskOutcome
from datacreator.logic.curation import RequestCuration
from datacreator.logic.embeddings import Embedder, shared_embedder

log = logging.getLogger(__name__)


class CuratorHandler(BaseHandler):
    name = "curator"
    ordered = True

    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.topics = [settings.topics.candidates]
        self.embedder = embedder
        self.requests: dict[str, RequestCuration] = {}
        self.partition_of: dict[str, int] = {}
        self._restored: dict[str, list[Example]] = defaultdict(list)
        self._held: set[int] = set()  # candidate partitions whose published examples are loaded
        self.status = StatusWatcher(settings, on_status=self._forget_if_final)

    async def start(self, ctx: Context) -> None:
        await super().start(ctx)
        await self.status.start()

    async def stop(self) -> None:
        await self.status.stop()

    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        numbers = sorted(tp.partition for tp in partitions if tp.topic == self.settings.topics.candidates)
        numbers = [p for p in numbers if p not in self._held]
        if not numbers:
            return
        self._held.update(numbers)
        count = 0
        async for record in read_to_end(self.settings, self.settings.topics.examples, numbers):
            try:
                example = decode(Example, record.value)
            except PoisonMessage:
                continue
            if self.status.is_closed(example.request_id):
                continue  # an ended request needs no dedup state
            self.partition_of[example.request_id] = record.partition
            curation = self.requests.get(example.request_id)
            if curation is not None:
                curation.restore(example)
            else:
                self._restored[example.request_id].append(example)
            count += 1
        if count:
            log.info("curator: restored %d published examples from partitions %s", count, numbers)
        self._update_gauges()

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        lost = {tp.partition for tp in partitions if tp.topic == self.settings.topics.candidates}
        self._held -= lost
        for request_id, partition in list(self.partition_of.items()):
            if partition in lost:
                self.requests.pop(request_id, None)
                self._restored.pop(request_id, None)
                del self.partition_of[request_id]
        self._update_gauges()

    def _curation(self, candidate: Candidate, partition: int) -> RequestCuration:
        request_id = candidate.task.request_id
        curation = self.requests.get(request_id)
        if curation is None:
            embedder = self.embedder
            if embedder is None and candidate.task.dedup.semantic_threshold is not None:
                embedder = self.embedder = shared_embedder()
            curation = RequestCuration.for_task(
                candidate.task,
                max_field_chars=self.settings.max_field_chars,
                raw_text_limit=self.settings.raw_text_limit,
                num_perm=self.settings.minhash_num_perm,
                embedder=embedder,
            )
            for example in self._restored.pop(request_id, []):
                curation.restore(example)
            self.requests[request_id] = curation
            self.partition_of[request_id] = partition
        return curation

    async def handle(self, record: ConsumerRecord) -> list[Output]:
        candidate = decode(Candidate, record.value, self.settings.max_message_bytes)
        topics = self.settings.topics
        request_id = candidate.task.request_id
        status = self.status.latest.get(request_id)
        if status is not None and status.state.final and (
            status.state != RequestState.COMPLETED or request_id not in self.requests
        ):
            return self._closed(candidate, status.state)
        curation = self._curation(candidate, record.partition)
        result = curation.curate(candidate)
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
            self.requests.pop(status.request_id, None)
            self._restored.pop(status.request_id, None)
            self.partition_of.pop(status.request_id, None)
            self._update_gauges()

    def _closed(self, candidate: Candidate, state: RequestState) -> list[Output]:
        task = candidate.task
        rejection = Rejection(request_id=task.request_id, task_id=task.task_id, reason=RejectReason.request_closed,
                              detail=f"request is {state.value}")
        outcome = TaskOutcome(task_id=task.task_id, request_id=task.request_id, chain=task.chain, step=task.step,
                              references=task.references, rejected={RejectReason.request_closed.value: 1},
                              usage=candidate.usage, cost_usd=candidate.cost_usd, latency_s=candidate.latency_s)
        metrics.examples_rejected.labels(RejectReason.request_closed.value).inc()
        topics = self.settings.topics
        return [Output(topics.rejected, task.request_id, rejection), Output(topics.outcomes, task.request_id, outcome)]

    def _update_gauges(self) -> None:
        metrics.dedup_requests.set(len(self.requests))
        metrics.dedup_state_entries.set(sum(c.state_size() for c in self.requests.values()))

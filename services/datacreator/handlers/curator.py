"""Curator: parse, validate and de-duplicate candidates; publish examples, rejections and task outcomes.

One request's candidates, examples and outcomes share a partition number (all keyed by request_id,
same partition count), so its dedup state lives in one curator, and after a rebalance or a crash
that curator rebuilds it by reading back the examples already published on its partitions.

The read back is decoded and restored in batches, off the event loop, and a partition that a
rebalance gives back to the same member keeps its state when no example was published on it
meanwhile (the examples partition still ends where it ended when it was revoked).

A candidate's examples are acknowledged before its outcome is sent: the planner counts what the
outcome says, so an outcome must never land while its examples may still be lost. Whenever the
state may be ahead of the topic (outputs that could not be published) it is rebuilt from the
topic before the next candidate of that request, and so is a COMPLETED request's whose state was
dropped: a redelivered candidate then republishes what is missing, and only that.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import orjson

from datacreator import metrics
from datacreator.bus.readback import StatusWatcher, end_offsets, read_models, read_to_end
from datacreator.bus.runtime import BaseHandler, Context, Delivery, Output
from datacreator.config import Settings
from datacreator.contracts import Candidate, Example, Rejection, RejectReason, RequestState, RequestStatus, TaskOutcome
from datacreator.logic.curation import CuratorState, Published, RequestCuration, Restored
from datacreator.logic.embeddings import Embedder
from datacreator.minilm import shared_embedder

log = logging.getLogger(__name__)

RESTORE_BATCH = 5_000  # records decoded (and restored) per step off the event loop


def _decode_examples(values: list[tuple[int, bytes | None]]) -> list[tuple[int, Restored]]:
    """(partition, example) of records of the examples topic, the curator's own output: only the
    fields a restore needs are read (a full validation costs more than the restore itself); a
    record that does not have them is skipped, as the DLQ already has it."""
    out: list[tuple[int, Restored]] = []
    for partition, value in values:
        try:
            raw: Any = orjson.loads(value) if value is not None else None
            example = Restored(raw["example_id"], raw["request_id"], raw["task_id"], raw["data"])
        except (orjson.JSONDecodeError, TypeError, KeyError):
            continue
        if isinstance(example.example_id, str) and isinstance(example.request_id, str) and isinstance(example.task_id, str):
            out.append((partition, example))
    return out

REOPENED_KEPT = 16


class CuratorHandler(BaseHandler):
    name = "curator"
    ordered = True
    pipelined = True  # curated in order; acknowledgements overlap the next candidates (bus/runtime.py)

    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.inputs = {settings.topics.candidates: Candidate}
        self.state = CuratorState(
            max_field_chars=settings.curator.max_field_chars,
            raw_text_limit=settings.curator.raw_text_limit,
            num_perm=settings.curator.minhash_num_perm,
            embedder=embedder,
            embedder_factory=shared_embedder,
        )
        self._held: set[int] = set()  # candidate partitions whose published examples are loaded
        # partitions given up in a rebalance, until the next assignment says whether they stay:
        # partition -> (end offset of its examples partition then, {request id: (curation, pending examples)})
        self._parked: dict[int, tuple[int, dict[str, tuple[RequestCuration | None, list[Published]]]]] = {}
        # Requests whose state must be read back from the topic before their next candidate: a
        # publish of theirs failed, or they ended COMPLETED and a candidate came back for them.
        self._stale: dict[str, int] = {}  # request id -> its partition
        self._reopened: OrderedDict[str, None] = OrderedDict()  # COMPLETED requests read back, newest last
        self.status = StatusWatcher(settings, on_status=self._forget_if_final)
        self.status.release_after(settings.runtime.final_state_ttl_s)  # ended requests' statuses go after their hold

    async def start(self, ctx: Context) -> None:
        await super().start(ctx)
        await self.status.start()

    async def stop(self) -> None:
        await self.status.stop()

    async def on_assigned(self, partitions: set[int]) -> None:
        kept = await self._unpark(partitions)
        numbers = sorted(partitions - self._held - kept)
        self._held.update(kept)
        if not numbers:
            self._update_gauges()
            return
        count = 0
        try:
            # complete=True: a read that stops short fails the take-over (the runner retries it);
            # a partial state would let a request past its target and accept near-duplicates.
            batch: list[tuple[int, bytes | None]] = []
            async for record in read_to_end(self.settings, self.settings.topics.examples, numbers, complete=True):
                batch.append((record.partition, record.value))
                if len(batch) >= RESTORE_BATCH:
                    count += await self._restore(batch)
                    batch = []
            count += await self._restore(batch)
        except BaseException:
            self.state.forget_partitions(set(numbers))
            raise
        self._held.update(numbers)
        if count:
            log.info("curator: restored %d published examples from partitions %s", count, numbers)
        self._update_gauges()

    async def _restore(self, batch: list[tuple[int, bytes | None]]) -> int:
        if not batch:
            return 0
        decoded = await asyncio.to_thread(_decode_examples, batch)
        by_request: dict[str, tuple[int, list[Published]]] = {}
        for partition, example in decoded:
            if self.status.is_closed(example.request_id):
                continue  # an ended request needs no dedup state
            by_request.setdefault(example.request_id, (partition, []))[1].append(example)
        for request_id, (partition, examples) in by_request.items():
            if request_id in self.state.requests:
                await asyncio.to_thread(self.state.restore_batch, request_id, examples, partition)
            else:  # indexed with its first task (the dedup settings come with it)
                self.state.restore_batch(request_id, examples, partition)
        return sum(len(examples) for _, examples in by_request.values())

    async def on_revoked(self, partitions: set[int]) -> None:
        whole = partitions & self._held  # a partition whose take-over failed has nothing to keep
        self._held -= partitions
        detached = self.state.detach(partitions)
        for request_id in [r for r in self._reopened if r not in self.state.requests]:
            del self._reopened[request_id]
        for request_id in [r for r, p in self._stale.items() if p in partitions]:
            del self._stale[request_id]
        self._update_gauges()
        # Parked, not dropped: with eager rebalancing every partition is revoked, and most come back.
        ends = await end_offsets(self.settings, self.settings.topics.examples, whole) if whole else None
        if ends is None:
            return
        for partition in whole & set(ends):
            self._parked[partition] = (ends[partition], {})
        for request_id, (partition, curation, pending) in detached.items():
            if partition in self._parked:
                self._parked[partition][1][request_id] = (curation, pending)

    async def _unpark(self, partitions: set[int]) -> set[int]:
        """The parked partitions assigned again that no one published an example on meanwhile:
        their state is taken back as it was."""
        parked, self._parked = self._parked, {}
        back = {p: v for p, v in parked.items() if p in partitions}
        ends = await end_offsets(self.settings, self.settings.topics.examples, back) if back else {}
        kept: set[int] = set()
        for partition, (end, requests) in back.items():
            if ends is not None and ends.get(partition) == end:
                kept.add(partition)
                for request_id, (curation, pending) in requests.items():
                    if not self.status.is_closed(request_id):
                        self.state.attach(request_id, partition, curation, pending)
        if kept:
            log.info("curator: kept the state of partitions %s across the rebalance", sorted(kept))
        return kept

    async def handle(self, candidate: Candidate, delivery: Delivery) -> list[Output]:
        topics = self.settings.topics
        request_id = candidate.task.request_id
        if (released := self.status.released_state(request_id)) is not None:
            return self._closed(candidate, released)  # ended long ago: its status is no longer held
        status = self.status.latest.get(request_id)
        if status is not None and status.state.final and status.state != RequestState.COMPLETED:
            return self._closed(candidate, status.state)
        if request_id in self._stale or (status is not None and status.state.final and request_id not in self.state.requests):
            # Curated again against what the topic holds: any example of this candidate that
            # never landed is accepted again (same id) and published; what did land is not.
            await self._read_back(request_id, delivery.partition, reopened=status is not None and status.state.final)
        # Large answers (parsing, validation, semantic-dedup embeddings) are curated off the event loop.
        if (len(candidate.raw_output or "") > 16_384 or candidate.task.dedup.semantic_threshold is not None
                or self.state.has_pending(request_id)):  # the first task after a restore indexes what was restored
            result = await asyncio.to_thread(self.state.curate, candidate, delivery.partition)
        else:
            result = self.state.curate(candidate, delivery.partition)
        assert result.outcome is not None
        # Stage 1: the outcome is sent once the examples are acknowledged (see Output.stage).
        outputs = [Output(topics.examples, request_id, e) for e in result.examples]
        outputs += [Output(topics.rejected, request_id, r) for r in result.rejections]
        outputs.append(Output(topics.outcomes, request_id, result.outcome, stage=1))
        metrics.examples_accepted.inc(len(result.examples))
        for rejection in result.rejections:
            metrics.examples_rejected.labels(rejection.reason.value).inc()
        metrics.observe_verification(result.outcome.verification)  # label checks
        self._update_gauges()
        return outputs

    def on_dead_letter(self, message: Any, delivery: Delivery, reason: Exception) -> list[Output]:
        """A candidate that could not be curated still answers its task, as a failed call: the
        planner would otherwise wait for that outcome for ever."""
        task = message.task
        if task.request_id in self.state.requests:
            # Its examples may be counted here and not be on the topic: read them back first.
            self.state.forget(task.request_id)
            self._stale[task.request_id] = delivery.partition
        outcome = TaskOutcome(task_id=task.task_id, request_id=task.request_id, chain=task.chain, step=task.step,
                              references=task.references, usage=message.usage, cost_usd=message.cost_usd,
                              latency_s=message.latency_s, attempts=message.attempts, throttled=message.throttled,
                              error=f"the curator could not process the candidate: {type(reason).__name__}: {str(reason)[:500]}",
                              model=message.model)
        return [Output(self.settings.topics.outcomes, task.request_id, outcome)]

    async def _read_back(self, request_id: str, partition: int, reopened: bool) -> None:
        self.state.forget(request_id)
        examples = [example async for _, example in read_models(
            self.settings, self.settings.topics.examples, Example, [partition], complete=True)
            if example.request_id == request_id]
        for example in examples:
            self.state.restore(example, partition)
        self._stale.pop(request_id, None)
        if reopened:
            self._keep_reopened(request_id)
        log.info("curator: read back %d published examples of %s", len(examples), request_id)

    def _forget_if_final(self, status: RequestStatus) -> None:
        """A request that has ended needs no dedup state; late candidates are answered from its
        status, but those of a COMPLETED one are still curated (a few such states are kept)."""
        if not status.state.final or status.request_id in self._reopened:
            return
        if status.state == RequestState.COMPLETED and status.request_id in self.state.requests \
                and status.request_id not in self._stale:
            self._keep_reopened(status.request_id)
        else:
            self.state.forget(status.request_id)
        self._update_gauges()

    def _keep_reopened(self, request_id: str) -> None:
        # Late candidates of a COMPLETED request come in bursts (the calls in flight when it ended):
        # keep a few of those states rather than read the partition back for each.
        self._reopened[request_id] = None
        self._reopened.move_to_end(request_id)
        while len(self._reopened) > REOPENED_KEPT:
            self.state.forget(self._reopened.popitem(last=False)[0])

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

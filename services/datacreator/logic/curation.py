"""The curator's per-request state machine: candidate in, examples + rejections + outcome out.

Pure and restart-safe: the state is rebuilt from the examples already published (`restore`),
and a candidate delivered again after a crash yields the same outcome and no new example,
because example ids are deterministic and each accepted id remembers the task it came from.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from datacreator.contracts import (
    AcceptedRef,
    Candidate,
    DedupSpec,
    Example,
    GenerationTask,
    Rejection,
    RejectReason,
    TaskOutcome,
)
from datacreator.logic.dedup import DedupIndex, Fingerprint, example_id, normalise
from datacreator.logic.embeddings import Embedder
from datacreator.logic.parsing import parse_examples
from datacreator.logic.shape import ordered_like
from datacreator.logic.validation import ExampleValidator
from datacreator.logic.verify import LabelChecks

RESTORE_SLICE = 1_000


class Published(Protocol):
    """What a restore reads of an example already published (an `Example`, or `Restored`)."""

    @property
    def example_id(self) -> str: ...
    @property
    def request_id(self) -> str: ...
    @property
    def task_id(self) -> str: ...
    @property
    def data(self) -> Any: ...


class Restored(NamedTuple):
    """The part of a published example a restore needs, read without validating the rest."""

    example_id: str
    request_id: str
    task_id: str
    data: Any


@dataclass(slots=True)
class CurationResult:
    examples: list[Example] = field(default_factory=list)  # new examples to publish
    rejections: list[Rejection] = field(default_factory=list)
    outcome: TaskOutcome | None = None
    redelivered: int = 0  # items accepted earlier from this same task, listed again but not republished


def _id_key(eid: str) -> bytes:
    """16 raw bytes for a hex id (half the memory of the str); other ids are kept as they are."""
    try:
        return bytes.fromhex(eid)
    except ValueError:
        return eid.encode()


def _clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit]


class RequestCuration:
    """One request's validator, dedup index and accepted ids."""

    def __init__(
        self,
        task: GenerationTask,
        *,
        max_field_chars: int = 5000,
        raw_text_limit: int = 2000,
        num_perm: int = 64,
        near_threshold: float | None = 0.85,
        semantic_threshold: float | None = None,
        allow_extra_keys: bool = False,
        embedder: Embedder | None = None,
    ) -> None:
        self.request_id = task.request_id
        self.target_count = task.target_count
        self.raw_text_limit = raw_text_limit
        if task.example_schema:
            self.validator = ExampleValidator.from_schema(
                task.example_schema, task.label_field, task.label_space, allow_extra_keys or None, max_field_chars
            )
        else:
            self.validator = ExampleValidator(
                task.references[0].data, task.label_field, task.label_space, allow_extra_keys, max_field_chars
            )
        self._example_keys = frozenset(self.validator.top_level_keys) or None
        if semantic_threshold is not None and embedder is None:
            raise ValueError("semantic dedup needs an embedder (datacreator.minilm.shared_embedder)")
        self.dedup = DedupIndex(near_threshold, num_perm, semantic_threshold, embedder)
        self.accepted_count = 0
        # example id (16 raw bytes) -> task id it was accepted from; task ids are interned.
        self._accepted_by: dict[bytes, str] = {}

    @classmethod
    def for_task(
        cls,
        task: GenerationTask,
        *,
        dedup: DedupSpec | None = None,
        max_field_chars: int = 5000,
        raw_text_limit: int = 2000,
        num_perm: int = 64,
        embedder: Embedder | None = None,
    ) -> RequestCuration:
        """Built from a request's first task seen; dedup settings come from the task unless given."""
        spec = dedup or getattr(task, "dedup", None) or DedupSpec()
        return cls(
            task,
            max_field_chars=max_field_chars,
            raw_text_limit=raw_text_limit,
            num_perm=num_perm,
            near_threshold=spec.near_duplicate_threshold,
            semantic_threshold=spec.semantic_threshold,
            allow_extra_keys=bool(getattr(task, "allow_extra_keys", False)),
            embedder=embedder,
        )

    def state_size(self) -> int:
        return len(self.dedup)

    # -- restart ------------------------------------------------------------------------------

    def restore(self, example: Example) -> None:
        """Take back an example already published (read from the examples topic)."""
        self.restore_many([example])

    def restore_many(self, examples: Iterable[Published]) -> None:
        fresh = [
            e for e in examples
            if e.request_id == self.request_id and _id_key(e.example_id) not in self._accepted_by
        ]
        if not fresh:
            return
        # In slices: a numpy pass holds the GIL, and a restore runs beside the event loop.
        for start in range(0, len(fresh), RESTORE_SLICE):
            part = fresh[start:start + RESTORE_SLICE]
            prints = []
            for example, fp in zip(part, self.dedup.fingerprints([e.data for e in part])):
                key = _id_key(example.example_id)
                if key in self._accepted_by:  # the same example twice in one batch
                    continue
                prints.append(fp)
                self._accepted_by[key] = sys.intern(example.task_id)
                self.accepted_count += 1
            self.dedup.add_many(prints)

    # -- curation -----------------------------------------------------------------------------

    def curate(self, candidate: Candidate) -> CurationResult:
        task = candidate.task
        result = CurationResult()
        counts: Counter[str] = Counter()
        accepted: list[AcceptedRef] = []

        def reject(reason: RejectReason, detail: str = "", item: Any = None, raw: str | None = None) -> None:
            counts[reason.value] += 1
            result.rejections.append(
                Rejection(request_id=task.request_id, task_id=task.task_id, reason=reason,
                          detail=_clip(detail, self.raw_text_limit) or "", item=item, raw=_clip(raw, self.raw_text_limit))
            )

        if candidate.error is not None:
            reject(RejectReason.llm_error, candidate.error)
            result.outcome = self._outcome(candidate, accepted, counts, error=candidate.error)
            return result

        parsed = parse_examples(candidate.raw_output, self._example_keys)
        for error in parsed.errors:
            reject(RejectReason(error.code), error.reason, item=error.item, raw=error.fragment)

        valid: list[Any] = []
        norms: list[str] = []
        marks: list[dict[str, Any]] = []
        references = {normalise(ref.data) for ref in task.references}
        checks = LabelChecks(candidate, self.validator)  # label checks (logic/verify.py)
        for index, item in enumerate(parsed.items):
            verdict = self.validator.validate(item)
            if verdict is not None:
                reject(verdict.reason, verdict.detail, item=item)
                continue
            # Label plan: the schema asked for the label first; give the item back the formatting example's key order.
            item = ordered_like(item, self.validator.schema)
            checked = checks.apply(index, item)
            if checked.rejection is not None:
                reject(checks.reason, checked.rejection, item=item)
                continue
            item = checked.item
            norm = normalise(item)
            if norm in references:
                reject(RejectReason.copy_of_reference, "same as a formatting example of this call", item=item)
                continue
            valid.append(item)
            norms.append(norm)
            marks.append(checked.marks)

        listed: set[str] = set()
        reference_ids = [ref.example_id for ref in task.references]
        # One batch for the answer's items and the call's formatting examples (one embedding call).
        # Small models often hand back their formatting example barely changed (a word, a "?").
        refs = [ref.data for ref in task.references]
        both = self.dedup.fingerprints(valid + refs, norms + [normalise(r) for r in refs]) if valid else []
        prints: list[Fingerprint] = both[:len(valid)]
        reference_prints = both[len(valid):]
        for item, norm, fp, mark in zip(valid, norms, prints, marks):
            eid = example_id(task.request_id, item, norm)
            if eid in listed:
                reject(RejectReason.duplicate, "repeated within this answer", item=item)
                continue
            if self._accepted_by.get(_id_key(eid)) == task.task_id:
                # Accepted from this very task before (a redelivery): report it again, publish nothing.
                listed.add(eid)
                accepted.append(AcceptedRef(example_id=eid, data=item))
                result.redelivered += 1
                continue
            if self.dedup.resembles(fp, reference_prints):
                reject(RejectReason.copy_of_reference, "a near-copy of a formatting example of this call", item=item)
                continue
            reason = self.dedup.check(fp)
            if reason is not None:
                reject(reason, "", item=item)
                continue
            if self.accepted_count >= self.target_count:
                reject(RejectReason.surplus, f"the request already has {self.target_count} examples", item=item)
                continue
            self.dedup.add(fp)
            self._accepted_by[_id_key(eid)] = sys.intern(task.task_id)
            self.accepted_count += 1
            listed.add(eid)
            accepted.append(AcceptedRef(example_id=eid, data=item))
            result.examples.append(
                Example(example_id=eid, request_id=task.request_id, data=item, strategy=task.strategy,
                        reference_ids=reference_ids, task_id=task.task_id, chain=task.chain, step=task.step,
                        model=candidate.model, **mark)
            )
        result.outcome = self._outcome(candidate, accepted, counts)
        result.outcome.verification = checks.result()
        return result

    def _outcome(self, candidate: Candidate, accepted: list[AcceptedRef], counts: Counter[str],
                 error: str | None = None) -> TaskOutcome:
        task = candidate.task
        return TaskOutcome(
            task_id=task.task_id, request_id=task.request_id, chain=task.chain, step=task.step,
            references=task.references, accepted=accepted, rejected=dict(counts), usage=candidate.usage,
            cost_usd=candidate.cost_usd, latency_s=candidate.latency_s, attempts=candidate.attempts, throttled=candidate.throttled, error=error,
            target_reached=self.accepted_count >= self.target_count,
            model=candidate.model,  # the status names the model that answered
        )


class CuratorState:
    """Every request's curation, plus restored examples of requests not seen in a task yet.

    Also remembers the partition each request lives on, so a curator that gives up partitions
    drops exactly their requests. `embedder_factory` is called once, when the first request
    asking for semantic dedup arrives (loading a sentence model costs seconds and memory).
    """

    def __init__(self, *, max_field_chars: int = 5000, raw_text_limit: int = 2000, num_perm: int = 64,
                 embedder: Embedder | None = None, embedder_factory: Callable[[], Embedder] | None = None) -> None:
        self.max_field_chars = max_field_chars
        self.raw_text_limit = raw_text_limit
        self.num_perm = num_perm
        self.embedder = embedder
        self.embedder_factory = embedder_factory
        self.requests: dict[str, RequestCuration] = {}
        self.partition_of: dict[str, int] = {}
        self._pending: dict[str, list[Published]] = {}

    def for_task(self, task: GenerationTask, dedup: DedupSpec | None = None, partition: int | None = None) -> RequestCuration:
        curation = self.requests.get(task.request_id)
        if curation is None:
            spec = dedup or task.dedup
            if self.embedder is None and spec.semantic_threshold is not None and self.embedder_factory is not None:
                self.embedder = self.embedder_factory()
            curation = RequestCuration.for_task(
                task, dedup=dedup, max_field_chars=self.max_field_chars, raw_text_limit=self.raw_text_limit,
                num_perm=self.num_perm, embedder=self.embedder,
            )
            curation.restore_many(self._pending.pop(task.request_id, []))
            self.requests[task.request_id] = curation
            if partition is not None:
                self.partition_of[task.request_id] = partition
        return curation

    def restore(self, example: Example, partition: int | None = None) -> None:
        if partition is not None:
            self.partition_of[example.request_id] = partition
        curation = self.requests.get(example.request_id)
        if curation is not None:
            curation.restore(example)
        else:
            self._pending.setdefault(example.request_id, []).append(example)

    def restore_batch(self, request_id: str, examples: list[Published], partition: int | None = None) -> None:
        """`restore` for many examples of one request (their dedup index is built in one pass)."""
        if partition is not None:
            self.partition_of[request_id] = partition
        curation = self.requests.get(request_id)
        if curation is not None:
            curation.restore_many(examples)
        else:
            self._pending.setdefault(request_id, []).extend(examples)

    def has_pending(self, request_id: str) -> bool:
        """Whether restored examples of the request wait for its first task to be indexed."""
        return request_id in self._pending

    def detach(self, partitions: set[int]) -> dict[str, tuple[int, RequestCuration | None, list[Published]]]:
        """Take the requests of some partitions out (to `attach` again if the partitions come back)."""
        out: dict[str, tuple[int, RequestCuration | None, list[Published]]] = {}
        for request_id, partition in list(self.partition_of.items()):
            if partition in partitions:
                out[request_id] = (partition, self.requests.pop(request_id, None), self._pending.pop(request_id, []))
                del self.partition_of[request_id]
        return out

    def attach(self, request_id: str, partition: int, curation: RequestCuration | None, pending: list[Published]) -> None:
        self.partition_of[request_id] = partition
        if curation is not None:
            self.requests[request_id] = curation
        if pending:
            self._pending.setdefault(request_id, []).extend(pending)

    def curate(self, candidate: Candidate, partition: int | None = None) -> CurationResult:
        return self.for_task(candidate.task, partition=partition).curate(candidate)

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self._pending.pop(request_id, None)
        self.partition_of.pop(request_id, None)

    def forget_partitions(self, lost: set[int]) -> None:
        """Drop the requests of partitions given up (their new owner rebuilds them)."""
        for request_id, partition in list(self.partition_of.items()):
            if partition in lost:
                self.forget(request_id)

    def state_size(self) -> int:
        return sum(c.state_size() for c in self.requests.values())

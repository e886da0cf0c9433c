"""What a request left on the bus, read back raw (duplicates kept), and the checks every fault test makes.

The checks, and why each is exact:
- examples: every published Example of the request, redeliveries included. The distinct ids must
  equal target_count and no id may appear twice: a candidate delivered again after a crash must
  be recognised by the curator (ids are deterministic), not published again.
- accounting: the planner applies the first outcome of each task and ignores later copies (calls
  still under way when the request ends are counted too, for their cost), so the settled status
  must equal that fold of the outcomes topic: accepted, rejections by reason, calls. Each outcome
  is published together with its task's rejections, so the rejected topic must hold at least as
  many rejections of each (task, reason) as the applied outcome counts. The topic may hold more: a redelivered candidate publishes its
  rejections again (they carry no id to drop them by), and a task answered twice (a generator
  killed after publishing, before committing) has a second candidate whose outcome is ignored.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from datacreator.bus.codec import decode
from datacreator.bus.readback import StatusWatcher, read_to_end
from datacreator.config import Settings
from datacreator.contracts import Example, Rejection, RequestStatus, TaskOutcome
from datacreator.logic.planning import accepted_after


@dataclass
class Ledger:
    examples: list[Example] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    outcomes: list[TaskOutcome] = field(default_factory=list)

    @property
    def example_ids(self) -> list[str]:
        return [e.example_id for e in self.examples]

    def duplicated_ids(self) -> list[str]:
        return [eid for eid, n in Counter(self.example_ids).items() if n > 1]


async def read_ledger(settings: Settings, request_id: str) -> Ledger:
    ledger = Ledger()
    topics = settings.topics
    for topic, model, into in (
        (topics.examples, Example, ledger.examples),
        (topics.rejected, Rejection, ledger.rejections),
        (topics.outcomes, TaskOutcome, ledger.outcomes),
    ):
        async for record in read_to_end(settings, topic):
            message = decode(model, record.value)
            if message.request_id == request_id:
                into.append(message)
    return ledger


@dataclass
class Fold:
    """The outcomes as the planner applies them: the first of each task, later copies ignored."""

    accepted: int = 0
    calls: int = 0
    failed: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    applied: list[TaskOutcome] = field(default_factory=list)
    ignored: int = 0


def fold_outcomes(outcomes: list[TaskOutcome], target_count: int) -> Fold:
    fold = Fold()
    seen: set[str] = set()
    for outcome in outcomes:  # one partition (keyed by request id): offset order is the planner's order
        if outcome.task_id in seen:
            fold.ignored += 1
            continue
        seen.add(outcome.task_id)
        fold.applied.append(outcome)
        fold.calls += outcome.attempts  # llm_calls counts HTTP attempts, retries included
        fold.failed += outcome.error is not None
        fold.accepted = accepted_after(fold.accepted, outcome, target_count)  # the planner's one counter
        fold.rejected.update(outcome.rejected)
    return fold


async def settled_status(settings: Settings, request_id: str, quiet_s: float = 1.5, timeout_s: float = 20.0) -> RequestStatus:
    """The request's last status once it is final and has not changed for `quiet_s`.

    Calls under way when a request ends still report (their cost counts), so the status keeps
    moving for a moment after it turned final.
    """
    watcher = await StatusWatcher(settings).start()
    deadline = time.monotonic() + timeout_s
    try:
        last, since = None, time.monotonic()
        while True:
            status = watcher.latest.get(request_id)
            if status is not None and (last is None or status.updated_at != last.updated_at):
                last, since = status, time.monotonic()
            if last is not None and last.state.final and time.monotonic() - since >= quiet_s:
                return last
            if time.monotonic() > deadline:
                raise TimeoutError(f"status of {request_id} did not settle: {last}")
            await asyncio.sleep(0.1)
    finally:
        await watcher.stop()


def check_examples(ledger: Ledger, target_count: int) -> None:
    ids = ledger.example_ids
    assert not ledger.duplicated_ids(), f"example ids published twice: {ledger.duplicated_ids()[:5]}"
    assert len(set(ids)) == target_count, f"{len(set(ids))} distinct examples, wanted {target_count}"


def check_accounting(ledger: Ledger, status: RequestStatus) -> Fold:
    """The settled status is the fold of the outcomes topic; every counted rejection is on the rejected topic.

    Read the ledger after `settled_status`, so both see the same outcomes.
    """
    fold = fold_outcomes(ledger.outcomes, status.target_count)
    assert status.accepted == fold.accepted, (status.accepted, fold.accepted)
    assert status.llm_calls == fold.calls, (status.llm_calls, fold.calls)
    assert status.failed_calls == fold.failed, (status.failed_calls, fold.failed)
    assert Counter(status.rejected) == +fold.rejected, (status.rejected, dict(fold.rejected))
    on_topic = Counter((r.task_id, r.reason.value) for r in ledger.rejections)
    for outcome in fold.applied:
        for reason, count in outcome.rejected.items():
            assert on_topic[(outcome.task_id, reason)] >= count, (
                f"task {outcome.task_id}: outcome counts {count} {reason}, the rejected topic has {on_topic[(outcome.task_id, reason)]}"
            )
    return fold


def summary(ledger: Ledger, status: RequestStatus, fold: Fold) -> dict[str, object]:
    """Counts for the report: what was lost, duplicated and completed."""
    return {
        "state": status.state.value,
        "target": status.target_count,
        "distinct_examples": len(set(ledger.example_ids)),
        "examples_published_twice": len(ledger.duplicated_ids()),
        "lost": max(status.target_count - len(set(ledger.example_ids)), 0),
        "status_rejected": sum(status.rejected.values()),
        "topic_rejections": len(ledger.rejections),
        "outcomes_ignored_as_copies": fold.ignored,
        "llm_calls": status.llm_calls,
    }

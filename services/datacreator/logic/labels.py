"""The label plan: which label each item of a call must carry, so a request's labels follow a target.

A small model pulls toward its formatting example's label (measured: 100 news items made from one
`tech` example came out 65% tech), and telling it otherwise in words does not stop that. So the
planner gives every item of a call its label, the schema pins it per position, and later calls
plan what is still missing: each label's target minus what was accepted and what is in flight.

Within one call the labels differ wherever the missing labels allow (the paper's rule: "the
created examples must all have different answers"), and among the labels used least in the call
the one missing most goes first. Ties are broken by a generator seeded per planning step, so the
same state always plans the same labels.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from datacreator.contracts import AcceptedRef
from datacreator.logic.shape import get_path

# Examples of each label kept for label-aware self-reference (the most recent ones), and in all:
# they ride in every plan snapshot.
PER_LABEL_REFERENCES = 8
MAX_REFERENCES = 256


def label_text(value: Any) -> str:
    """The key of a label in counts and distributions: a string as it is, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def label_of(data: Any, field: str) -> str | None:
    """The label text of an example, or None when it has no label at `field`."""
    missing = object()
    value = get_path(data, field, missing)
    return None if value is missing else label_text(value)


def shares_for(space: Sequence[Any], distribution: Mapping[str, float] | None) -> list[float]:
    """Normalised target shares in the order of `space`; raises ValueError with a reason."""
    texts = [label_text(v) for v in space]
    if len(set(texts)) != len(texts):
        raise ValueError("label_space holds the same label twice")
    if distribution is None:
        return [1.0 / len(space)] * len(space)
    unknown = sorted(set(distribution) - set(texts))
    if unknown:
        raise ValueError(f"label_distribution names labels not in the label space: {unknown[:5]}")
    total = sum(distribution.values())
    if not total > 0:
        raise ValueError("label_distribution shares sum to 0")
    return [distribution.get(t, 0.0) / total for t in texts]


def integer_targets(shares: Sequence[float], total: int) -> list[int]:
    """Whole counts summing to `total`, each within 1 of its share (largest remainder; ties: earlier label)."""
    exact = [s * total for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


class LabelPlan(BaseModel):
    """A request's label plan: part of the planner's snapshot."""

    model_config = ConfigDict(extra="forbid")

    field: str
    labels: list[Any] = Field(..., description="The label space, in its order.")
    targets: list[int] = Field(..., description="Accepted examples wanted per label, summing to target_count.")
    accepted: dict[str, int] = Field(default_factory=dict, description="Accepted per label text.")
    recent: dict[str, list[AcceptedRef]] = Field(default_factory=dict, description="Latest accepted examples per label.")

    @classmethod
    def create(cls, field: str, space: Sequence[Any], distribution: Mapping[str, float] | None, target: int) -> LabelPlan:
        return cls(field=field, labels=list(space), targets=integer_targets(shares_for(space, distribution), target))

    @property
    def texts(self) -> list[str]:
        return [label_text(v) for v in self.labels]

    def target_map(self) -> dict[str, int]:
        return dict(zip(self.texts, self.targets))

    def record(self, accepted: Iterable[AcceptedRef]) -> None:
        keep = max(1, min(PER_LABEL_REFERENCES, MAX_REFERENCES // len(self.labels)))
        for item in accepted:
            text = label_of(item.data, self.field)
            if text is None:
                continue
            self.accepted[text] = self.accepted.get(text, 0) + 1
            kept = self.recent.setdefault(text, [])
            kept.append(item)
            del kept[:-keep]

    def plan_call(self, n: int, in_flight: Iterable[Any], rng: random.Random) -> list[Any]:
        """Up to `n` labels for one call: what is still missing, as varied as that allows."""
        texts = self.texts
        pending: dict[str, int] = {}
        for value in in_flight:
            text = label_text(value)
            pending[text] = pending.get(text, 0) + 1
        want = [t - self.accepted.get(x, 0) - pending.get(x, 0) for t, x in zip(self.targets, texts)]
        used = [0] * len(texts)
        picks: list[Any] = []
        for _ in range(n):
            open_ = [i for i in range(len(texts)) if want[i] - used[i] > 0]
            if not open_:
                break
            fewest = min(used[i] for i in open_)
            open_ = [i for i in open_ if used[i] == fewest]
            most = max(want[i] - used[i] for i in open_)
            open_ = [i for i in open_ if want[i] - used[i] == most]
            chosen = open_[rng.randrange(len(open_))] if len(open_) > 1 else open_[0]
            used[chosen] += 1
            picks.append(self.labels[chosen])
        return picks

    def references_for(self, label: Any, choices: Sequence[AcceptedRef]) -> list[AcceptedRef]:
        """Label-aware self-reference: the choices of `label`, else the request's latest of it."""
        text = label_text(label)
        same = [c for c in choices if label_of(c.data, self.field) == text]
        return same or list(self.recent.get(text, []))

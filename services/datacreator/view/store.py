"""What the web view knows about each request, as an in-memory index fed message by message.

Pure code (no Kafka, no HTTP): the server hands it decoded messages and asks it for pages.
An example is kept as its raw JSON bytes plus the few fields a page, the label chart and the
lineage tree need, so 100k examples cost tens of MB, and a page decodes only its own rows.
A request keeps at most `max_examples` rows (the oldest go first; the counts stay exact).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import orjson

from datacreator.contracts import CreationRequest, Example, Rejection, RequestStatus
from datacreator.logic.shape import get_path
from datacreator.report import _label_key, distinct_n, find_label_field

SEED = "seed"  # the lineage node of the request's own formatting example
SAMPLES_PER_REASON = 5
DIVERSITY_SAMPLE = 2000  # distinct-2 over the newest this many examples: bounded work as a request grows


@dataclass(slots=True)
class Row:
    example_id: str
    created_at: float
    task_id: str
    chain: int
    step: int
    reference_ids: tuple[str | None, ...]
    label: str | None
    raw: bytes  # the Example message as published

    def example(self) -> Example:
        return Example.model_validate_json(self.raw)


@dataclass
class RequestIndex:
    request_id: str
    max_examples: int
    status: RequestStatus | None = None
    request: CreationRequest | None = None
    rows: deque[Row] = field(default_factory=deque)  # oldest first
    ids: set[str] = field(default_factory=set)
    children: dict[str, list[str]] = field(default_factory=dict)  # reference id (or SEED) -> example ids
    parents: dict[str, str] = field(default_factory=dict)  # example id -> its first reference (or SEED)
    nodes: dict[str, tuple[int, int, str | None, str]] = field(default_factory=dict)  # id -> chain, step, label, preview
    label_field: str | None = None
    labels: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    samples: dict[str, deque[dict[str, Any]]] = field(default_factory=dict)
    progress: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=600))
    diversity: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=300))
    dropped: int = 0
    changed_at: float = 0.0

    # -- feeding --------------------------------------------------------------------------

    def _insert(self, row: Row) -> None:
        """Keep rows in creation order: the curator acknowledges a partition's examples over several
        producers, so one can land a few records after a newer one; walking back from the end finds
        its place in a step or two."""
        rows = self.rows
        if not rows or rows[-1].created_at <= row.created_at:
            rows.append(row)
            return
        at = len(rows) - 1
        while at > 0 and rows[at - 1].created_at > row.created_at:
            at -= 1
        rows.insert(at, row)

    def add_example(self, example: Example, raw: bytes) -> bool:
        if example.example_id in self.ids:
            return False  # a redelivery: same id, same example
        if self.label_field is None:
            self.label_field = (self.request.label_field if self.request else None) or find_label_field([example.data])
        value = get_path(example.data, self.label_field) if self.label_field else None
        label = None if value is None else _label_key(value)
        row = Row(example.example_id, example.created_at, example.task_id, example.chain, example.step,
                  tuple(example.reference_ids), label, raw)
        self._insert(row)
        self.ids.add(row.example_id)
        if label is not None:
            self.labels[label] += 1
        parent = next((r for r in row.reference_ids if r is not None), None) or SEED
        self.parents[row.example_id] = parent
        self.children.setdefault(parent, []).append(row.example_id)
        self.nodes[row.example_id] = (row.chain, row.step, label, _preview(example.data))
        while len(self.rows) > self.max_examples:
            old = self.rows.popleft()
            self.dropped += 1
            self.ids.discard(old.example_id)  # the tree keeps its node: lineage stays whole
        self.changed_at = time.time()
        return True

    def add_rejection(self, rejection: Rejection) -> None:
        reason = rejection.reason.value
        self.rejected[reason] += 1
        text = rejection.raw if rejection.raw is not None else (
            None if rejection.item is None else orjson.dumps(rejection.item).decode())
        kept = self.samples.setdefault(reason, deque(maxlen=SAMPLES_PER_REASON))
        kept.append({"task_id": rejection.task_id, "detail": rejection.detail, "text": text, "created_at": rejection.created_at})
        self.changed_at = time.time()

    def set_status(self, status: RequestStatus) -> None:
        if not status.supersedes(self.status):
            return
        self.status = status
        if not self.progress or self.progress[-1][1] != status.accepted:
            self.progress.append((status.updated_at, status.accepted))
        self.changed_at = time.time()

    # -- reading ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        s = self.status
        budget = self.request.budget if self.request else None
        cost = s.cost_usd if s else 0.0
        return {
            "request_id": self.request_id,
            "state": s.state.value if s else "UNKNOWN",
            "target_count": s.target_count if s else (self.request.target_count if self.request else None),
            "accepted": s.accepted if s else len(self.ids),
            "rejected": sum(self.rejected.values()) or (sum(s.rejected.values()) if s else 0),
            "llm_calls": s.llm_calls if s else 0,
            "failed_calls": s.failed_calls if s else 0,
            "rate_limited": s.throttled_calls if s is not None else None,
            "cost_usd": cost,
            "max_cost_usd": budget.max_cost_usd if budget else None,
            "budget_used": (cost / budget.max_cost_usd) if budget and budget.max_cost_usd else None,
            "max_llm_calls": budget.max_llm_calls if budget else None,
            "examples_per_second": s.examples_per_second if s else 0.0,
            "strategy": (s.strategy.value if s and s.strategy else None) or (self.request.strategy.value if self.request else None),
            "model": s.model if s else None,
            "error": s.error if s else None,
            "started_at": s.started_at if s else None,
            "updated_at": s.updated_at if s else self.changed_at,
        }

    def detail(self) -> dict[str, Any]:
        out = self.summary()
        out["instruction"] = self.request.instruction if self.request else None
        out["examples_kept"] = len(self.rows)
        out["examples_dropped"] = self.dropped
        out["rejections"] = dict(self.rejected.most_common()) or (dict(self.status.rejected) if self.status else {})
        out["labels"] = self.label_figures()
        out["progress"] = list(self.progress)
        out["diversity"] = list(self.diversity)
        out["tokens"] = {"prompt": self.status.prompt_tokens, "completion": self.status.completion_tokens} if self.status else None
        return out

    def label_figures(self) -> dict[str, Any]:
        """Counts by label and their target: the status's when it carries them, else an even share of the label space."""
        status = self.status.model_dump() if self.status else {}
        counts = status.get("label_counts") or dict(self.labels)
        targets = status.get("label_targets") or status.get("targets")
        space = self.request.label_space if self.request else None
        source = "status" if targets else None
        if not targets and space and self.status:
            share = self.status.target_count / len(space)
            targets = {_label_key(v): round(share, 2) for v in space}
            source = "even share of the label space"
        names = list(dict.fromkeys([*(targets or {}), *sorted(counts, key=lambda k: -counts[k])]))
        return {"field": self.label_field, "target_source": source,
                "rows": [{"label": n, "count": counts.get(n, 0), "target": (targets or {}).get(n)} for n in names]}

    def page(self, offset: int = 0, limit: int = 50, query: str | None = None) -> dict[str, Any]:
        """Newest first; `query` matches case-insensitively anywhere in the example's JSON."""
        offset, limit = max(offset, 0), min(max(limit, 1), 500)
        if not query:  # the total is known: skip to the page without looking at the rows before it
            picked = list(islice(reversed(self.rows), offset, offset + limit))
            matched = len(self.rows)
        else:
            needle = query.casefold().encode()
            picked, matched = [], 0
            for row in reversed(self.rows):
                if needle not in row.raw.lower():
                    continue
                if offset <= matched < offset + limit:
                    picked.append(row)
                matched += 1
        items = []
        for row in picked:
            message = orjson.loads(row.raw)
            items.append({
                "example_id": row.example_id, "created_at": row.created_at, "data": message.get("data"),
                "label": row.label, "reference_ids": list(row.reference_ids), "chain": row.chain, "step": row.step,
                "task_id": row.task_id, "model": message.get("model"),
            })
        return {"offset": offset, "limit": limit, "total": matched, "query": query or None, "items": items}

    def rejection_samples(self) -> dict[str, Any]:
        reasons = self.rejected.most_common()
        if not reasons and self.status:
            reasons = sorted(self.status.rejected.items(), key=lambda kv: -kv[1])
        return {"reasons": [{"reason": r, "count": n, "samples": list(self.samples.get(r, ()))} for r, n in reasons]}

    def lineage(self, parent: str | None = None, path_of: str | None = None, limit: int = 200) -> dict[str, Any] | None:
        """Children of one node (the seed by default), or the path from an example back to the seed."""
        if path_of is not None:
            if path_of not in self.nodes:
                return None
            path = [path_of]
            while path[-1] != SEED and len(path) < 10_000:
                path.append(self.parents.get(path[-1], SEED))
            return {"path": [self._node(n) for n in path]}
        node = parent or SEED
        if node != SEED and node not in self.nodes:
            return None
        kids = self.children.get(node, [])
        return {"node": self._node(node), "total": len(kids), "children": [self._node(k) for k in kids[:limit]]}

    def _node(self, node: str) -> dict[str, Any]:
        if node == SEED:
            preview = _preview(self.request.formatting_example) if self.request else "the formatting example"
            return {"id": SEED, "chain": None, "step": None, "label": None, "preview": preview, "children": len(self.children.get(SEED, []))}
        chain, step, label, preview = self.nodes[node]
        return {"id": node, "chain": chain, "step": step, "label": label, "preview": preview, "children": len(self.children.get(node, []))}

    def diversity_texts(self) -> list[str]:
        from datacreator.logic.embeddings import example_text

        newest = list(self.rows)[-DIVERSITY_SAMPLE:]
        return [example_text(orjson.loads(r.raw)["data"]) for r in newest]

    def record_diversity(self, texts: list[str], mean_distance: float | None) -> dict[str, Any]:
        point = {"at": time.time(), "examples": len(self.ids) + self.dropped, "sample": len(texts),
                 "distinct_2": round(distinct_n(texts, 2), 4), "mean_embedding_distance": mean_distance}
        self.diversity.append(point)
        return point


def _preview(data: Any, limit: int = 120) -> str:
    text = orjson.dumps(data).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ViewStore:
    """Every request the bus has shown so far."""

    def __init__(self, max_examples: int = 200_000) -> None:
        self.max_examples = max_examples
        self.requests: dict[str, RequestIndex] = {}

    def get(self, request_id: str) -> RequestIndex | None:
        return self.requests.get(request_id)

    def _index(self, request_id: str) -> RequestIndex:
        index = self.requests.get(request_id)
        if index is None:
            index = self.requests[request_id] = RequestIndex(request_id, self.max_examples)
        return index

    def add_request(self, request: CreationRequest) -> None:
        index = self._index(request.request_id)
        index.request = request
        if request.label_field:
            index.label_field = request.label_field

    def add_status(self, status: RequestStatus) -> None:
        self._index(status.request_id).set_status(status)

    def add_example(self, example: Example, raw: bytes | None = None) -> bool:
        return self._index(example.request_id).add_example(example, raw if raw is not None else example.model_dump_json().encode())

    def add_rejection(self, rejection: Rejection) -> None:
        self._index(rejection.request_id).add_rejection(rejection)

    def listing(self) -> list[dict[str, Any]]:
        """Running requests first, then the most recently updated."""
        rows = [i.summary() for i in self.requests.values()]
        running = ("ACCEPTED", "RUNNING", "UNKNOWN")
        return sorted(rows, key=lambda r: (r["state"] not in running, -(r["started_at"] or r["updated_at"] or 0)))

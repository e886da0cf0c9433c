"""The view's in-memory index, fed directly: pages, search, lineage, labels, bounds."""

from __future__ import annotations

import tracemalloc

from datacreator.contracts import CreationRequest, Example, Rejection, RejectReason, RequestState, RequestStatus, Strategy
from datacreator.view.store import SEED, ViewStore
from tests.helpers import MCQ, MCQ_INSTRUCTION


def _example(i: int, ref: str | None = None, request_id: str = "r") -> Example:
    data = {**MCQ, "question": f"question number {i} about things", "answer": "ABCD"[i % 4]}
    return Example(example_id=f"e{i}", request_id=request_id, data=data, strategy=Strategy.random,
                   reference_ids=[ref], task_id=f"t{i // 5}", chain=i % 3, step=i // 5, model="m", created_at=1000.0 + i)


def test_pages_are_newest_first_and_a_huge_offset_is_empty():
    store = ViewStore()
    for i in range(120):
        store.add_example(_example(i))
    index = store.get("r")
    first = index.page(0, 50)
    assert first["total"] == 120 and [e["example_id"] for e in first["items"][:2]] == ["e119", "e118"]
    assert index.page(100, 50)["items"][-1]["example_id"] == "e0"
    assert index.page(10**9, 50)["items"] == []


def test_a_redelivered_example_is_counted_once():
    store = ViewStore()
    assert store.add_example(_example(1)) and not store.add_example(_example(1))
    assert store.get("r").page()["total"] == 1


def test_search_matches_anywhere_case_insensitively():
    store = ViewStore()
    for i in range(30):
        store.add_example(_example(i))
    found = store.get("r").page(0, 50, "NUMBER 2")
    assert sorted(e["example_id"] for e in found["items"]) == ["e2", "e20", "e21", "e22", "e23", "e24", "e25", "e26", "e27", "e28", "e29"]
    assert found["total"] == 11


def test_lineage_children_and_path_back_to_the_seed():
    store = ViewStore()
    store.add_example(_example(0, None))
    store.add_example(_example(1, "e0"))
    store.add_example(_example(2, "e1"))
    index = store.get("r")
    root = index.lineage()
    assert root["node"]["id"] == SEED and [c["id"] for c in root["children"]] == ["e0"]
    assert [c["id"] for c in index.lineage("e0")["children"]] == ["e1"]
    assert [n["id"] for n in index.lineage(path_of="e2")["path"]] == ["e2", "e1", "e0", SEED]
    assert index.lineage("nope") is None


def test_labels_against_an_even_share_of_the_label_space_and_rejections_with_samples():
    store = ViewStore()
    store.add_request(CreationRequest(request_id="r", instruction=MCQ_INSTRUCTION, formatting_example=MCQ, target_count=8,
                                      label_field="answer", label_space=["A", "B", "C", "D"]))
    store.add_status(RequestStatus(request_id="r", state=RequestState.RUNNING, target_count=8, accepted=3))
    for i in range(3):
        store.add_example(_example(i))
    store.add_rejection(Rejection(request_id="r", task_id="t0", reason=RejectReason.unparseable, raw="not json {"))
    labels = {row["label"]: row for row in store.get("r").label_figures()["rows"]}
    assert labels["A"]["count"] == 1 and labels["D"]["count"] == 0 and labels["B"]["target"] == 2.0
    reasons = store.get("r").rejection_samples()["reasons"]
    assert reasons[0]["reason"] == "unparseable" and reasons[0]["samples"][0]["text"] == "not json {"


def test_a_100k_example_request_pages_without_decoding_them_all():
    store = ViewStore(max_examples=100_000)
    for i in range(100_000):
        store.add_example(_example(i))
    index = store.get("r")
    tracemalloc.start()
    page = index.page(50_000, 50)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert page["total"] == 100_000 and len(page["items"]) == 50
    assert page["items"][0]["example_id"] == "e49999"
    assert peak < 5_000_000  # a page costs its rows, not the request


def test_the_oldest_rows_go_beyond_the_bound_and_counts_stay():
    store = ViewStore(max_examples=10)
    for i in range(25):
        store.add_example(_example(i))
    index = store.get("r")
    assert len(index.rows) == 10 and index.dropped == 15
    assert sum(index.labels.values()) == 25
    assert index.page(0, 50)["items"][-1]["example_id"] == "e15"

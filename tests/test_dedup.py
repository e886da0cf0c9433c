"""Normalisation, deterministic ids, and exact / near / semantic de-duplication."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from datacreator.contracts import RejectReason
from datacreator.logic.dedup import DedupIndex, MinHasher, content_hash, example_id, normalise

SPIDER = {"question": "How many legs does a spider have?", "options": {"A": "six", "B": "eight", "C": "ten", "D": "four"}, "answer": "B"}
LONG = {
    "question": "Which of the following instruments did the orchestra add to the second movement of the symphony "
    "after the conductor asked for a warmer sound in the hall?",
    "options": {"A": "a cello", "B": "a flute", "C": "a harp", "D": "a tuba"},
    "answer": "C",
}


def test_normalise_is_canonical() -> None:
    a = {"b": "  Hello\tWORLD \n", "a": [1, "ＡＢＣ  x"], "c": {"z": True, "y": None}}
    b = {"c": {"y": None, "z": True}, "a": [1, "abc x"], "b": "hello world"}
    assert normalise(a) == normalise(b)
    assert normalise(a) == '{"a":[1,"abc x"],"b":"hello world","c":{"y":null,"z":true}}'
    assert normalise({"x": "Straße"}) == normalise({"x": "STRASSE"})  # casefold, not lower
    assert normalise({"x": 1}) != normalise({"x": "1"})
    assert normalise({"x": [1, 2]}) != normalise({"x": [2, 1]})


def test_ids_are_deterministic() -> None:
    shuffled = {"answer": "B", "options": SPIDER["options"], "question": "  how many LEGS does a spider have? "}
    assert content_hash(SPIDER) == content_hash(shuffled)
    assert content_hash(SPIDER) == hashlib.sha256(normalise(SPIDER).encode()).hexdigest()
    eid = example_id("req-1", SPIDER)
    assert len(eid) == 32 and int(eid, 16) >= 0
    assert eid == example_id("req-1", shuffled)
    assert eid == hashlib.sha256(("req-1\n" + normalise(SPIDER)).encode()).hexdigest()[:32]
    assert eid != example_id("req-2", SPIDER)


def test_ids_are_stable_across_processes() -> None:
    code = "from datacreator.logic.dedup import example_id; print(example_id('r', {'q': 'Ünïcode  text', 'a': [1.5, True]}))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert runs == {example_id("r", {"q": "Ünïcode  text", "a": [1.5, True]}) + "\n"}


def test_exact_duplicates() -> None:
    index = DedupIndex(near_threshold=None)
    assert index.check(SPIDER) is None
    index.add(SPIDER, "id-1")
    assert len(index) == 1
    variant = {"question": "HOW many legs does a  spider have?", "options": dict(SPIDER["options"]), "answer": "B"}
    assert index.check(variant) is RejectReason.duplicate
    assert index.check({**SPIDER, "answer": "C"}) is None
    index.add(variant)
    assert len(index) == 1


def test_near_duplicates() -> None:
    index = DedupIndex(near_threshold=0.8)
    index.add(LONG, "id-1")
    appended = {**LONG, "question": LONG["question"] + " Pick one."}
    assert index.check(appended) is RejectReason.near_duplicate
    other = {"question": "What is the boiling point of water at sea level in degrees Celsius on a normal day?",
             "options": {"A": "90", "B": "100", "C": "110", "D": "120"}, "answer": "B"}
    assert index.check(other) is None
    # Near dedup off: only exact copies are caught.
    exact_only = DedupIndex(near_threshold=None)
    exact_only.add(LONG)
    assert exact_only.check(appended) is None
    assert exact_only.check(LONG) is RejectReason.duplicate


def test_near_dedup_on_short_texts() -> None:
    index = DedupIndex(near_threshold=0.7)
    index.add({"text": "red apple pie"})
    # Punctuation keeps the texts apart for exact dedup, but their words are the same.
    assert index.check({"text": "Red apple pie!"}) is RejectReason.near_duplicate
    assert index.check({"text": "red apple, pie"}) is RejectReason.near_duplicate
    assert index.check({"text": "blue car"}) is None
    empty = DedupIndex()
    empty.add({"text": "", "n": None})
    assert empty.check({"text": " ", "n": None}) is RejectReason.duplicate
    assert empty.check({"text": "something"}) is None


def test_minhash_estimates_jaccard() -> None:
    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(3000)]
    hasher = MinHasher(num_perm=128)
    errors = []
    for _ in range(30):
        base = rng.sample(vocab, 60)
        keep = rng.randint(20, 60)
        other = base[:keep] + rng.sample(vocab, 60 - keep)
        a, b = " ".join(base), " ".join(other)
        sig = hasher.signatures([a, b])
        sa = {tuple(base[i:i + 3]) for i in range(len(base) - 2)}
        sb = {tuple(other[i:i + 3]) for i in range(len(other) - 2)}
        true = len(sa & sb) / len(sa | sb)
        errors.append(abs(float((sig[0] == sig[1]).mean()) - true))
    assert np.mean(errors) < 0.06
    assert max(errors) < 0.2
    # Batching does not change a signature.
    texts = ["one two three four five six seven eight nine ten", "alpha beta", "", "x y z w"]
    together = hasher.signatures(texts)
    for row, text in enumerate(texts):
        assert (hasher.signatures([text])[0] == together[row]).all()


def test_near_dedup_recall_and_precision_on_many_pairs() -> None:
    rng = random.Random(11)
    vocab = [f"word{i}" for i in range(5000)]
    index = DedupIndex(near_threshold=0.85)
    bases = []
    for i in range(300):
        words = rng.sample(vocab, 40)
        bases.append(words)
        index.add({"text": " ".join(words)}, f"id-{i}")
    caught = sum(index.check({"text": " ".join(words + ["extra"])}) is RejectReason.near_duplicate for words in bases)
    false = sum(index.check({"text": " ".join(rng.sample(vocab, 40))}) is not None for _ in range(300))
    assert caught >= 270  # true Jaccard ~0.97
    assert false == 0


class FixedEmbedder:
    """Vectors chosen per text: lets the semantic path run without a model."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table

    def embed(self, texts):
        rows = np.array([self.table[t] for t in texts], dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_semantic_needs_an_embedder() -> None:
    with pytest.raises(ValueError):
        DedupIndex(semantic_threshold=0.9)


def test_semantic_threshold_with_known_vectors() -> None:
    embedder = FixedEmbedder({"a": [1, 0, 0], "b": [0.95, 0.3, 0], "c": [0, 1, 0]})
    index = DedupIndex(near_threshold=None, semantic_threshold=0.9, embedder=embedder)
    index.add({"t": "a"})
    assert index.check({"t": "b"}) is RejectReason.semantic_duplicate  # cosine ~0.95
    assert index.check({"t": "c"}) is None
    strict = DedupIndex(near_threshold=None, semantic_threshold=0.99, embedder=embedder)
    strict.add({"t": "a"})
    assert strict.check({"t": "b"}) is None


@pytest.mark.slow
def test_semantic_with_minilm() -> None:
    from datacreator.minilm import MiniLMEmbedder

    index = DedupIndex(near_threshold=0.85, semantic_threshold=0.9, embedder=MiniLMEmbedder())
    index.add(SPIDER, "id-1")
    planet = {"question": "Which planet in our solar system is the largest?",
              "options": {"A": "Mars", "B": "Jupiter", "C": "Venus", "D": "Earth"}, "answer": "B"}
    index.add(planet, "id-2")
    assert len(index) == 2
    paraphrases = [
        {"question": "What is the number of legs on a spider?", "options": SPIDER["options"], "answer": "B"},
        {"question": "What is the biggest planet in the solar system?",
         "options": {"A": "Earth", "B": "Jupiter", "C": "Mars", "D": "Venus"}, "answer": "B"},
    ]
    for item in paraphrases:
        assert index.check(item) is RejectReason.semantic_duplicate
    unrelated = {"question": "What is the boiling point of water at sea level?",
                 "options": {"A": "90 C", "B": "100 C", "C": "110 C", "D": "120 C"}, "answer": "B"}
    assert index.check(unrelated) is None
    prints = index.fingerprints([unrelated, paraphrases[0]])
    assert [index.check(fp) for fp in prints] == [None, RejectReason.semantic_duplicate]


def test_zero_width_characters_do_not_make_a_new_example() -> None:
    # Before: NFKC keeps U+200B, so the same sentence with zero-width characters had another id.
    plain = {"text": "The cat sat on the mat.", "label": "neutral"}
    hidden = {"text": "The\u200b cat\u2060 sat on\ufeff the\u200d mat.", "label": "neutral\u200b"}
    assert normalise(plain) == normalise(hidden)
    assert example_id("r", plain) == example_id("r", hidden)
    index = DedupIndex(near_threshold=None)
    index.add(plain)
    assert index.check(hidden) is RejectReason.duplicate


async def test_semantic_dedup_embeds_off_the_event_loop_in_one_batch() -> None:
    # Before: the curator embedded on the event loop, and items and formatting examples in two calls.
    import threading

    from datacreator.bus.runtime import Delivery
    from datacreator.config import Settings
    from datacreator.contracts import Candidate, DedupSpec
    from datacreator.handlers.curator import CuratorHandler
    from tests.helpers import item, make_task

    calls: list[tuple[str, int]] = []

    class RecordingEmbedder:
        def embed(self, texts):
            calls.append((threading.current_thread().name, len(texts)))
            rng = np.random.default_rng(len(calls))
            vectors = rng.normal(size=(len(texts), 8)).astype(np.float32)
            return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    handler = CuratorHandler(Settings(), embedder=RecordingEmbedder())
    task = make_task(dedup=DedupSpec(semantic_threshold=0.99))
    raw = json.dumps({"examples": [item(1), item(2), item(3)]})
    candidate = Candidate(task=task, endpoint="default", model="m", raw_output=raw)
    outputs = await handler.handle(candidate, Delivery("datacreator.candidates", 0, 0, task.request_id, b""))
    assert sum(o.topic == handler.settings.topics.examples for o in outputs) == 3
    assert calls == [(calls[0][0], 4)] and calls[0][0] != threading.main_thread().name

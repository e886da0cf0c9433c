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
from datacreator.logic.dedup import DedupIndex, KeyTable, MinHasher, _low16, content_hash, example_id, normalise

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



def _texts(rng: random.Random, n: int, words: tuple[int, int] = (12, 28)) -> list[str]:
    vocab = [f"w{i}" for i in range(20_000)]
    return [" ".join(rng.choices(vocab, k=rng.randint(*words))) for _ in range(n)]


def test_key_table_finds_entries_in_the_dict_and_in_the_sorted_arrays() -> None:
    table = KeyTable(fraction=1 / 4, minimum=8)
    table.add_each([0, 0xFFFFFFFF, 7], 1)  # the smallest and largest keys: a search wraps past the end
    table.add(7, 2)
    for value in range(3, 40):  # past the dict's limit a few times
        table.add(1000 + value, value)
    assert table.merged > 0 and len(table) > table.merged  # both parts hold entries
    table.add(7, 99)  # a key in the arrays and in the dict
    assert sorted(table.get(7)) == [1, 2, 99]
    assert table.get(0) == [1] and table.get(0xFFFFFFFF) == [1] and table.get(5) == []
    assert sorted(table.get_many([0, 7, 1039, 123456])) == [1, 1, 2, 39, 99]
    assert table.get_many([0xFFFFFFFE, 1, 6]) == []
    found = table.get_each(np.array([7, 0xFFFFFFFF, 6, 1039], dtype=np.uint32))
    assert [sorted(v) for v in found] == [[1, 2, 99], [1], [], [39]]
    table.add_many(np.array([7, 5], dtype=np.uint32), np.array([100, 101], dtype=np.uint32))  # into the dict
    table.add_many(np.arange(50, 150, dtype=np.uint32), np.arange(100, dtype=np.uint32))  # straight into the arrays
    assert sorted(table.get(7)) == [1, 2, 99, 100] and table.get(5) == [101] and table.get(149) == [99]
    assert len(table) == 4 + 37 + 1 + 2 + 100
    table.merge()
    assert table.merged == len(table) and sorted(table.get(7)) == [1, 2, 99, 100]


def test_duplicates_are_found_in_the_sorted_part_and_in_the_recent_part() -> None:
    rng = random.Random(3)
    texts = _texts(rng, 2000, words=(30, 40))  # one word more keeps a Jaccard of ~0.97
    index = DedupIndex(near_threshold=0.85)
    for text in texts:
        index.add({"text": text})
    table = index._table
    assert table.merged > 0 and len(table) > table.merged  # merged several times, and entries wait in the dict
    last_key = int.from_bytes(index.fingerprint({"text": texts[-1]}).digest[:4], "little")
    assert last_key in table._recent  # the last example is in the dict, the first ones in the arrays
    for text in texts[:50] + texts[-50:]:
        assert index.check({"text": "  " + text.upper() + " "}) is RejectReason.duplicate
        assert index.check({"text": text + " and"}) is RejectReason.near_duplicate
    assert all(index.check({"text": text}) is None for text in _texts(random.Random(4), 200))
    assert len(index) == 2000


def test_a_restore_with_add_many_finds_what_adding_one_by_one_finds() -> None:
    rng = random.Random(5)
    texts = _texts(rng, 3000)
    stream = []
    for i, text in enumerate(texts):
        stream.append({"text": text})
        if i % 7 == 0:
            stream.append({"text": texts[rng.randrange(i + 1)].upper()})  # exact repeat
        if i % 11 == 0:
            stream.append({"text": texts[rng.randrange(i + 1)] + " more"})  # near repeat
        if i % 97 == 0:
            stream.append({"text": "", "n": i % 3})  # no words: exact dedup only
    one_by_one = DedupIndex(near_threshold=0.85)
    accepted = []
    for item in stream:
        if one_by_one.check(item) is None:
            one_by_one.add(item)
            accepted.append(item)
    restored = DedupIndex(near_threshold=0.85)
    prints = restored.fingerprints(accepted)
    restored.add_many(prints[:5] + prints[:5])  # the same examples twice in one batch
    for start in range(5, len(prints), 700):  # batches smaller and larger than the dict may hold
        restored.add_many(prints[start:start + 700] + prints[start - 5:start])  # with some already restored
    restored.add_many(prints[-3:])
    assert len(restored) == len(one_by_one) == len(accepted)
    probes = stream + [{"text": t + " again"} for t in texts[::13]] + [{"text": t} for t in _texts(random.Random(6), 300)]
    verdicts = [one_by_one.check(item) for item in probes]
    assert [restored.check(item) for item in probes] == verdicts
    assert verdicts[:len(stream)].count(None) == 0 and {None, RejectReason.near_duplicate} <= set(verdicts)
    exact_only = DedupIndex(near_threshold=None)
    exact_only.add_many(exact_only.fingerprints(accepted))
    assert len(exact_only) == len(accepted)
    assert all(exact_only.check({**item, "text": item["text"].upper()}) is RejectReason.duplicate for item in accepted)
    assert exact_only.check({"text": texts[1] + " extra words"}) is None


def test_add_after_check_of_the_same_example_adds_it_once() -> None:
    index = DedupIndex()
    fp = index.fingerprint(LONG)
    assert index.check(fp) is None
    index.add(fp)
    variant = {**LONG, "question": LONG["question"].upper()}  # another object, the same digest
    assert index.check(variant) is RejectReason.duplicate
    index.add(variant)
    index.add(fp)
    assert len(index) == 1
    assert index.check(SPIDER) is None
    index.add(index.fingerprint(SPIDER))  # not the object checked: looked up again
    index.add(SPIDER)
    assert len(index) == 2


def test_sixteen_bits_per_minhash_value_keep_the_estimate() -> None:
    # Two different minima agree on their low 16 bits about once in 65,536 permutations.
    hasher = MinHasher(num_perm=64)
    signatures = hasher.signatures(_texts(random.Random(8), 4000))
    a, b = signatures[:2000], signatures[2000:]
    full = int((a == b).sum())
    low = int((_low16(a) == _low16(b)).sum())
    assert low >= full and low - full <= 12  # 128,000 pairs of values: ~2 expected
    same = hasher.signatures(["the cat sat on the mat and looked at the dog for a while"] * 2)
    assert (_low16(same[0]) == _low16(same[1])).all()


def test_memory_per_example_stays_small() -> None:
    # Before: a set of digests, a uint32 signature matrix grown by half and a dict of band keys
    # held ~960 bytes per example.
    import gc
    import tracemalloc

    texts = _texts(random.Random(9), 20_000)
    prints = DedupIndex(near_threshold=0.85).fingerprints([{"text": t} for t in texts])
    for fp in prints:
        fp.band_keys = None  # made again under tracemalloc: the index keeps those ints
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        one_by_one = DedupIndex(near_threshold=0.85)
        for fp in prints:
            if one_by_one.check(fp) is None:
                one_by_one.add(fp)
            fp.band_keys = None  # cached on the fingerprint, which the index does not keep
        gc.collect()
        added = (tracemalloc.get_traced_memory()[0] - before) / len(one_by_one)
        before = tracemalloc.get_traced_memory()[0]
        restored = DedupIndex(near_threshold=0.85)
        for start in range(0, len(prints), 1000):
            restored.add_many(prints[start:start + 1000])
        gc.collect()
        restored_bytes = (tracemalloc.get_traced_memory()[0] - before) / len(restored)
    finally:
        tracemalloc.stop()
    assert len(one_by_one) == len(restored) == 20_000
    # A row of 64 + 8 uint16 and 8 table entries of 8 bytes: 208, plus spare rows and the dict.
    assert added < 300 and restored_bytes < 300, (added, restored_bytes)


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

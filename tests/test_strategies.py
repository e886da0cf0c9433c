"""Self-reference selection rules, on known embeddings and on the real sentence model."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from datacreator.contracts import AcceptedRef, Reference, Strategy
from datacreator.logic.embeddings import example_text
from datacreator.logic.strategies import (
    CachedEmbedder,
    derive_rng,
    needs_embeddings,
    select_reference,
    shuffled,
    similarities,
    tree_children,
)


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


class TableEmbedder:
    """Maps each example's text to a fixed vector; records what it was asked to embed."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table
        self.calls: list[list[str]] = []

    def embed(self, texts):
        self.calls.append(list(texts))
        return np.stack([self.table[t] for t in texts])


SEED = Reference(example_id=None, data={"text": "seed"})
CANDIDATES = [
    AcceptedRef(example_id="near", data={"text": "near"}),
    AcceptedRef(example_id="far", data={"text": "far"}),
    AcceptedRef(example_id="middle", data={"text": "middle"}),
]
TABLE = {
    "seed": unit(1, 0, 0),
    "near": unit(0.95, 0.05, 0),  # cosine ~1 to the seed
    "middle": unit(0.5, 0.5, 0),  # ~0.71
    "far": unit(-0.2, 1, 0),  # slightly negative
}


@pytest.fixture
def embed() -> CachedEmbedder:
    return CachedEmbedder(TableEmbedder(TABLE))


def test_contrastive_picks_least_similar_to_previous(embed: CachedEmbedder) -> None:
    chosen = select_reference(Strategy.contrastive, SEED, CANDIDATES, random.Random(0), embed)
    assert chosen.example_id == "far"


def test_similar_picks_most_similar_to_previous(embed: CachedEmbedder) -> None:
    chosen = select_reference(Strategy.similar, SEED, CANDIDATES, random.Random(0), embed)
    assert chosen.example_id == "near"


def test_anchor_is_the_previous_formatting_example_not_the_seed(embed: CachedEmbedder) -> None:
    previous = Reference(example_id="far", data={"text": "far"})
    candidates = [c for c in CANDIDATES if c.example_id != "far"] + [AcceptedRef(example_id="seed2", data={"text": "seed"})]
    # Relative to "far", the seed-like example is the least similar and "middle" the most.
    assert select_reference(Strategy.contrastive, previous, candidates, random.Random(0), embed).example_id == "seed2"
    assert select_reference(Strategy.similar, previous, candidates, random.Random(0), embed).example_id == "middle"


def test_similarities_are_cosines(embed: CachedEmbedder) -> None:
    scores = similarities(SEED, CANDIDATES, embed)
    expected = [float(TABLE[c.data["text"]] @ TABLE["seed"]) for c in CANDIDATES]
    assert np.allclose(scores, expected, atol=1e-6)


def test_random_stays_within_candidates_and_is_roughly_uniform() -> None:
    picks = Counter(select_reference(Strategy.random, SEED, CANDIDATES, random.Random(i)).example_id for i in range(600))
    assert set(picks) == {c.example_id for c in CANDIDATES}
    assert min(picks.values()) > 150  # each of 3 expected ~200 times


def test_random_is_deterministic_for_the_same_step() -> None:
    first = [select_reference(Strategy.random, SEED, CANDIDATES, derive_rng("req", "choose", 0, i)) for i in range(20)]
    again = [select_reference(Strategy.random, SEED, CANDIDATES, derive_rng("req", "choose", 0, i)) for i in range(20)]
    assert first == again
    assert len({c.example_id for c in first}) > 1


def test_single_candidate_needs_no_embedding() -> None:
    table = TableEmbedder(TABLE)
    only = [CANDIDATES[0]]
    assert select_reference(Strategy.contrastive, SEED, only, random.Random(0), CachedEmbedder(table)) == only[0]
    assert table.calls == []


def test_selection_errors() -> None:
    with pytest.raises(ValueError, match="no accepted examples"):
        select_reference(Strategy.random, SEED, [], random.Random(0))
    with pytest.raises(ValueError, match="embedding function"):
        select_reference(Strategy.contrastive, SEED, CANDIDATES, random.Random(0), None)
    for strategy in (Strategy.none, Strategy.tree):
        with pytest.raises(ValueError, match="does not pick"):
            select_reference(strategy, SEED, CANDIDATES, random.Random(0))
    assert needs_embeddings(Strategy.similar) and needs_embeddings(Strategy.contrastive)
    assert not needs_embeddings(Strategy.random) and not needs_embeddings(Strategy.tree)


def test_cached_embedder_embeds_each_example_once_in_one_batch() -> None:
    table = TableEmbedder(TABLE)
    embed = CachedEmbedder(table)
    first = embed([SEED, *CANDIDATES])
    again = embed([CANDIDATES[2], SEED, CANDIDATES[0]])
    assert table.calls == [["seed", "near", "far", "middle"]]
    assert embed.embedded == 4
    assert np.allclose(again, np.stack([first[3], first[0], first[1]]))
    # A new example costs one more embedding, the cached ones none.
    embed([SEED, AcceptedRef(example_id="x", data={"text": "far"})])
    assert table.calls[-1] == ["far"] and embed.embedded == 5


def test_cached_embedder_is_bounded() -> None:
    table = TableEmbedder({"a": unit(1, 0), "b": unit(0, 1), "c": unit(1, 1)})
    embed = CachedEmbedder(table, max_items=2)
    items = [AcceptedRef(example_id=k, data={"t": k}) for k in "abc"]
    for item in items:
        embed([item])
    assert len(embed) == 2
    embed([items[0]])  # evicted first, so embedded again
    assert table.calls[-1] == ["a"]


def test_shuffle_is_seeded() -> None:
    items = list(range(20))
    a = shuffled(items, derive_rng("req", "tree", 1))
    b = shuffled(items, derive_rng("req", "tree", 1))
    c = shuffled(items, derive_rng("req", "tree", 2))
    assert a == b and sorted(a) == items and a != items
    assert a != c
    assert items == list(range(20))  # the input is left alone


def test_tree_children_bounded_by_branching() -> None:
    assert tree_children(CANDIDATES, 2) == CANDIDATES[:2]
    assert tree_children(CANDIDATES, 10) == CANDIDATES


@pytest.mark.slow
def test_real_sentence_model_orders_by_meaning() -> None:
    from datacreator.minilm import shared_embedder

    previous = Reference(example_id=None, data={"question": "The cat sat on the mat.", "answer": "yes"})
    candidates = [
        AcceptedRef(example_id="dog", data={"question": "A dog sleeps on the carpet.", "answer": "yes"}),
        AcceptedRef(example_id="kitten", data={"question": "A kitten is sitting on the mat.", "answer": "yes"}),
        AcceptedRef(example_id="bank", data={"question": "Quarterly revenue of the bank grew by four percent.", "answer": "yes"}),
    ]
    embed = CachedEmbedder(shared_embedder())
    assert select_reference(Strategy.similar, previous, candidates, random.Random(0), embed).example_id == "kitten"
    assert select_reference(Strategy.contrastive, previous, candidates, random.Random(0), embed).example_id == "bank"
    assert embed.embedded == 4  # the second choice reused every embedding
    assert example_text(previous.data) == "The cat sat on the mat. yes"


def test_as_embed_fn_wraps_text_embedders_once() -> None:
    from datacreator.logic.strategies import as_embed_fn

    table = TableEmbedder(TABLE)
    cached = CachedEmbedder(table)
    assert as_embed_fn(None) is None and as_embed_fn(cached) is cached
    wrapped = as_embed_fn(table.embed)
    assert isinstance(wrapped, CachedEmbedder)
    assert as_embed_fn(table.embed) is wrapped and as_embed_fn(table) is wrapped  # bound methods compare equal
    assert select_reference(Strategy.contrastive, SEED, CANDIDATES, random.Random(0), wrapped).example_id == "far"
    with pytest.raises(TypeError):
        as_embed_fn(42)

"""Self-reference: which example becomes the next call's formatting example.

Pure functions over known inputs. Embeddings come through an `EmbedFn`, a synchronous callable
from examples (`Reference`/`AcceptedRef`) to L2-normalised rows; `CachedEmbedder` builds one from
any `Embedder` and embeds each example once (batched, cached by example id), and `as_embed_fn`
turns a plain text embedding function (`Embedder.embed`) into a shared `CachedEmbedder`. It may
be slow (a sentence model on CPU), so callers on an event loop run the planning step that uses
it in a worker thread.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from datacreator.contracts import AcceptedRef, Reference, Strategy
from datacreator.logic.embeddings import Embedder, example_text

Item = Reference | AcceptedRef
EmbedFn = Callable[[Sequence[Item]], np.ndarray]
T = TypeVar("T")

# Strategies whose choice compares embeddings.
EMBEDDING_STRATEGIES = frozenset({Strategy.contrastive, Strategy.similar})


def needs_embeddings(strategy: Strategy) -> bool:
    return Strategy(strategy) in EMBEDDING_STRATEGIES


def derive_rng(*parts: object) -> random.Random:
    """A generator seeded by `parts`: the same planning step always draws the same numbers.

    Seeding per decision (instead of carrying one generator along) keeps choices independent of
    the order outcomes arrive in and leaves no generator state to snapshot.
    """
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def select_reference(
    strategy: Strategy,
    previous: Reference,
    choices: Sequence[AcceptedRef],
    rng: random.Random,
    embed: EmbedFn | None = None,
) -> AcceptedRef:
    """Pick the next formatting example among `choices`.

    `previous` is the formatting example of the call that produced the choices (the examples it had accepted).
    random: uniform; contrastive: least cosine similarity to `previous`; similar: the greatest
    (ties go to the earliest choice). `none` and `tree` choose no single successor.
    """
    strategy = Strategy(strategy)
    if not choices:
        raise ValueError("no accepted examples to choose a reference from")
    if strategy is Strategy.random:
        return choices[rng.randrange(len(choices))]
    if strategy in EMBEDDING_STRATEGIES:
        if embed is None:
            raise ValueError(f"strategy {strategy.value!r} needs an embedding function")
        if len(choices) == 1:
            return choices[0]
        scores = similarities(previous, choices, embed)
        index = int(np.argmin(scores)) if strategy is Strategy.contrastive else int(np.argmax(scores))
        return choices[index]
    raise ValueError(f"strategy {strategy.value!r} does not pick a single reference")


def similarities(anchor: Item, choices: Sequence[Item], embed: EmbedFn) -> np.ndarray:
    """Cosine similarity of each choice to `anchor` (one embedding call for all of them)."""
    vectors = np.asarray(embed([anchor, *choices]), dtype=np.float32)
    if vectors.shape[0] != len(choices) + 1:
        raise ValueError(f"embedding function returned {vectors.shape[0]} rows for {len(choices) + 1} examples")
    return vectors[1:] @ vectors[0]


def shuffled(items: Sequence[T], rng: random.Random) -> list[T]:
    out = list(items)
    rng.shuffle(out)
    return out


def tree_children(accepted: Sequence[AcceptedRef], branching: int) -> list[AcceptedRef]:
    """The children of one tree node kept for the next level: at most `branching`, in output order."""
    return list(accepted[: max(branching, 0)])


def item_key(item: Item) -> str:
    """Cache key of an example: its id, or a content hash for the seed (which has none)."""
    if item.example_id is not None:
        return item.example_id
    return "seed:" + hashlib.sha256(example_text(item.data).encode()).hexdigest()


class CachedEmbedder:
    """An `EmbedFn` over an `Embedder`: missing examples are embedded in one batch, then cached.

    Bounded (least recently used entries go first) and safe to call from several threads.
    """

    def __init__(self, embedder: Embedder, max_items: int = 50_000) -> None:
        self._embedder = embedder
        self._max_items = max_items
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.embedded = 0  # examples actually sent to the model, for tests and metrics

    def __call__(self, items: Sequence[Item]) -> np.ndarray:
        keys = [item_key(item) for item in items]
        with self._lock:
            missing = {key: item for key, item in zip(keys, items) if key not in self._cache}
        if missing:
            vectors = np.asarray(self._embedder.embed([example_text(item.data) for item in missing.values()]), dtype=np.float32)
            with self._lock:
                for key, vector in zip(missing, vectors):
                    self._cache[key] = vector
                self.embedded += len(missing)
        with self._lock:
            rows = []
            for key in keys:
                vector = self._cache.get(key)
                if vector is None:  # evicted between the two steps by a concurrent caller
                    vector = np.asarray(self._embedder.embed([example_text(items[keys.index(key)].data)]), dtype=np.float32)[0]
                    self._cache[key] = vector
                self._cache.move_to_end(key)
                rows.append(vector)
            while len(self._cache) > self._max_items:
                self._cache.popitem(last=False)
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack(rows)

    def __len__(self) -> int:
        return len(self._cache)


class _FunctionEmbedder:
    def __init__(self, fn: Callable[[Sequence[str]], np.ndarray]) -> None:
        self.embed = fn


_wrapped: dict[Any, CachedEmbedder] = {}
_wrapped_lock = threading.Lock()


def as_embed_fn(embed: Any) -> EmbedFn | None:
    """An example-level, cached `EmbedFn` from a `CachedEmbedder` (returned as is), an `Embedder`,
    or a text embedding function such as `Embedder.embed`.

    Text embedders get one cache each for the life of the process, shared by every plan.
    """
    if embed is None or isinstance(embed, CachedEmbedder):
        return embed
    fn = embed.embed if hasattr(embed, "embed") else embed
    if not callable(fn):
        raise TypeError(f"not an embedding function: {type(embed).__name__}")
    with _wrapped_lock:
        cached = _wrapped.get(fn)  # bound methods of one object compare equal
        if cached is None:
            cached = _wrapped[fn] = CachedEmbedder(_FunctionEmbedder(fn))
        return cached

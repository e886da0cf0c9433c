"""De-duplication of accepted examples: exact, near (MinHash LSH) and semantic (embeddings).

The index keeps no texts: a 16-byte digest per example for exact matches, its MinHash signature
(one uint32 per permutation) and one small int per LSH band for near matches, and an embedding
row when semantic dedup is on. The band tables are plain dicts rather than datasketch's
MinHashLSH storage (a set per bucket and a key table), which held about 3x the memory per
example; the bands and rows come from datasketch's own optimiser, and every example sharing an LSH band is
verified against its stored signature, so a near duplicate means an estimated Jaccard >= threshold.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import orjson
from datasketch import MinHashLSH

from datacreator.contracts import RejectReason
from datacreator.logic.embeddings import Embedder, example_text
from datacreator.logic.validation import strip_invisible

_WORD = re.compile(r"\w+")
_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xC2B2AE3D27D4EB4F)
_EMPTY_ROW = np.uint32(0xFFFFFFFF)
# Weight of false positives vs false negatives when choosing bands: band matches are verified
# against the stored signatures, so a missed pair costs more than an extra match.
LSH_WEIGHTS = (0.1, 0.9)


def _norm_text(text: str) -> str:
    if not text.isascii():
        # NFKC keeps zero-width characters: without stripping them one sentence has many ids.
        text = unicodedata.normalize("NFKC", strip_invisible(text))
    return " ".join(text.casefold().split())


def _norm_value(value: Any) -> Any:
    if isinstance(value, str):
        return _norm_text(value)
    if isinstance(value, dict):
        return {key: _norm_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_norm_value(item) for item in value]
    return value


def normalise(data: Any) -> str:
    """Canonical text of a JSON value: strings NFKC, casefolded, whitespace collapsed; keys sorted."""
    return orjson.dumps(_norm_value(data), option=orjson.OPT_SORT_KEYS).decode()


def content_hash(data: Any) -> str:
    return hashlib.sha256(normalise(data).encode()).hexdigest()


def example_id(request_id: str, data: Any, normalised: str | None = None) -> str:
    """Deterministic id of an example within its request: a redelivery carries the same id."""
    text = normalise(data) if normalised is None else normalised
    return hashlib.sha256(f"{request_id}\n{text}".encode()).hexdigest()[:32]


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising datasketch's weighted error at `threshold`."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r


class MinHasher:
    """MinHash signatures of word shingles, many texts per numpy pass.

    Shingles are 3 words long, 2 for texts under 9 words, single words under 4 words. Values
    follow datasketch's `affine32` scheme: h -> a*h + b mod 2^32 with odd a, min over shingles.
    """

    def __init__(self, num_perm: int = 64, seed: int = 1) -> None:
        self.num_perm = num_perm
        self.seed = seed
        gen = np.random.RandomState(seed)
        self._a = (gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)).astype(np.uint32)
        self._b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint64).astype(np.uint32)

    @staticmethod
    def shingle_size(word_count: int) -> int:
        return 3 if word_count >= 9 else 2 if word_count >= 4 else 1

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text (uint32, num_perm wide); a text with no words gets all-max values."""
        out = np.full((len(texts), self.num_perm), _EMPTY_ROW, dtype=np.uint32)
        words: list[int] = []
        spans: list[tuple[int, int, int]] = []  # (row, first word, word count)
        for row, text in enumerate(texts):
            tokens = _WORD.findall(text.casefold())
            if tokens:
                spans.append((row, len(words), len(tokens)))
                words.extend(map(zlib.crc32, map(str.encode, tokens)))
        if not spans:
            return out
        w = np.array(words, dtype=np.uint64)
        with np.errstate(over="ignore"):
            grams = {1: w, 2: w[:-1] * _K1 + w[1:], 3: (w[:-2] * _K1 + w[1:-1]) * _K2 + w[2:]}
            pieces = []
            offsets = []
            total = 0
            for _row, first, count in spans:
                size = self.shingle_size(count)
                pieces.append(grams[size][first:first + count - size + 1])
                offsets.append(total)
                total += count - size + 1
            keys = _fmix64(np.concatenate(pieces)) >> np.uint64(32)
            values = keys.astype(np.uint32)[:, None] * self._a + self._b
        rows = [row for row, _, _ in spans]
        out[rows] = np.minimum.reduceat(values, np.array(offsets), axis=0)
        return out


@dataclass(slots=True)
class Fingerprint:
    """What the index needs to know about one example, computed once."""

    normalised: str
    digest: bytes
    signature: np.ndarray | None = None
    vector: np.ndarray | None = None
    band_keys: list[int] | None = None


class DedupIndex:
    """Accepted examples of one request; `check` says whether a new one repeats any of them."""

    def __init__(
        self,
        near_threshold: float | None = 0.85,
        num_perm: int = 64,
        semantic_threshold: float | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        if semantic_threshold is not None and embedder is None:
            raise ValueError("semantic dedup needs an embedder")
        self.near_threshold = near_threshold
        self.semantic_threshold = semantic_threshold
        self.embedder = embedder
        self._exact: set[bytes] = set()
        self._count = 0
        self._hasher = MinHasher(num_perm) if near_threshold is not None else None
        # LSH band tables, all bands in one dict: band key -> row, or list of rows on collision.
        self._bands, self._rows = lsh_params(near_threshold, num_perm) if near_threshold is not None else (0, 0)
        self._buckets: dict[int, int | list[int]] = {}
        gen = np.random.RandomState(7)
        self._band_mix = gen.randint(1, 1 << 62, (self._bands, self._rows), dtype=np.uint64) | np.uint64(1)
        self._band_salt = gen.randint(1, 1 << 62, self._bands, dtype=np.uint64)
        self._signatures = np.zeros((0, num_perm), dtype=np.uint32)
        self._vectors: np.ndarray | None = None

    def __len__(self) -> int:
        return self._count

    def fingerprints(self, items: Sequence[Any], normalised: Sequence[str] | None = None) -> list[Fingerprint]:
        """Fingerprints of several examples at once (one MinHash pass, one embedding call)."""
        norms = list(normalised) if normalised is not None else [normalise(item) for item in items]
        prints = [Fingerprint(n, hashlib.sha256(n.encode()).digest()[:16]) for n in norms]
        if not prints or (self._hasher is None and self.embedder is None):
            return prints
        texts = [example_text(item) for item in items]
        if self._hasher is not None:
            for fp, row in zip(prints, self._hasher.signatures(texts)):
                fp.signature = row
        if self.semantic_threshold is not None and self.embedder is not None:
            for fp, vector in zip(prints, np.asarray(self.embedder.embed(texts), dtype=np.float32)):
                fp.vector = vector
        return prints

    def fingerprint(self, item: Any) -> Fingerprint:
        return self.fingerprints([item])[0]

    def check(self, item: Any) -> RejectReason | None:
        """duplicate / near_duplicate / semantic_duplicate, or None when the example is new."""
        fp = item if isinstance(item, Fingerprint) else self.fingerprint(item)
        if fp.digest in self._exact:
            return RejectReason.duplicate
        if self._hasher is not None and fp.signature is not None and fp.signature[0] != _EMPTY_ROW and self._count:
            sharing: list[int] = []  # stored examples that share a band with this one
            if fp.band_keys is None:
                fp.band_keys = self._band_keys(fp.signature)
            for band in fp.band_keys:
                hit = self._buckets.get(band)
                if hit is not None:
                    sharing.extend(hit) if isinstance(hit, list) else sharing.append(hit)
            if sharing:
                similarity = (self._signatures[sharing] == fp.signature).mean(axis=1)
                if self.near_threshold is not None and float(similarity.max()) >= self.near_threshold:
                    return RejectReason.near_duplicate
        if self._vectors is not None and fp.vector is not None and self._count:
            cosines = self._vectors[: self._count] @ fp.vector
            if self.semantic_threshold is not None and float(cosines.max()) >= self.semantic_threshold:
                return RejectReason.semantic_duplicate
        return None

    def resembles(self, fp: Fingerprint, others: Sequence[Fingerprint]) -> bool:
        """Whether `fp` is a near-duplicate of any of `others` (compared directly, not indexed)."""
        if self._hasher is None or fp.signature is None or fp.signature[0] == _EMPTY_ROW:
            return False
        assert self.near_threshold is not None
        return any(
            o.signature is not None and float((o.signature == fp.signature).mean()) >= self.near_threshold for o in others
        )

    def add(self, item: Any, key: Any = None) -> None:
        """Remember an accepted example. `key` is not stored: rows are numbered internally."""
        fp = item if isinstance(item, Fingerprint) else self.fingerprint(item)
        if fp.digest in self._exact:
            return
        self._exact.add(fp.digest)
        row = self._count
        self._count += 1
        if self._hasher is not None:
            signature = fp.signature if fp.signature is not None else self._hasher.signatures([""])[0]
            self._signatures = _append_row(self._signatures, row, signature)
            if signature[0] != _EMPTY_ROW:
                keys = fp.band_keys if fp.band_keys is not None and fp.signature is signature else self._band_keys(signature)
                self._bucket(row, keys)
        if self.semantic_threshold is not None and fp.vector is not None:
            if self._vectors is None:
                self._vectors = np.zeros((max(16, row + 1), fp.vector.shape[0]), dtype=np.float32)
            self._vectors = _append_row(self._vectors, row, fp.vector)

    def add_many(self, prints: Sequence[Fingerprint]) -> None:
        """`add` for many fingerprints at once (a restore): band keys in one numpy pass, rows appended together."""
        fresh: list[Fingerprint] = []
        seen: set[bytes] = set()
        for fp in prints:
            if fp.digest not in self._exact and fp.digest not in seen:
                seen.add(fp.digest)
                fresh.append(fp)
        if not fresh:
            return
        if self._hasher is None or (self.semantic_threshold is not None and any(fp.vector is not None for fp in fresh)):
            for fp in fresh:
                self.add(fp)
            return
        empty = self._hasher.signatures([""])[0]
        signatures = np.stack([fp.signature if fp.signature is not None else empty for fp in fresh])
        first = self._count
        self._count += len(fresh)
        self._exact.update(fp.digest for fp in fresh)
        if self._signatures.shape[0] < self._count:
            grown = np.zeros((max(16, self._count * 3 // 2 + 1), self._signatures.shape[1]), dtype=self._signatures.dtype)
            grown[:first] = self._signatures[:first]
            self._signatures = grown
        self._signatures[first:self._count] = signatures
        live = np.flatnonzero(signatures[:, 0] != _EMPTY_ROW)
        if not len(live):
            return
        bands = signatures[live, : self._bands * self._rows].astype(np.uint64).reshape(len(live), self._bands, self._rows)
        with np.errstate(over="ignore"):
            keys = ((bands * self._band_mix).sum(axis=2, dtype=np.uint64) + self._band_salt) >> np.uint64(4)
        for row, row_keys in zip((first + live).tolist(), keys.tolist()):
            self._bucket(row, row_keys)

    def _bucket(self, row: int, keys: Sequence[int]) -> None:
        """File a row under each of its band keys (a lone row is stored bare: most buckets hold one)."""
        buckets = self._buckets
        for band in keys:
            hit = buckets.get(band)
            if hit is None:
                buckets[band] = row
            elif isinstance(hit, list):
                hit.append(row)
            else:
                buckets[band] = [hit, row]

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        bands = signature[: self._bands * self._rows].astype(np.uint64).reshape(self._bands, self._rows)
        with np.errstate(over="ignore"):
            keys = (bands * self._band_mix).sum(axis=1, dtype=np.uint64) + self._band_salt
        return (keys >> np.uint64(4)).tolist()  # 60 bits: the smallest int objects that hold them


def _append_row(matrix: np.ndarray, row: int, values: np.ndarray) -> np.ndarray:
    """Write `values` at `row`, growing the matrix geometrically (amortised O(1) appends)."""
    if row >= matrix.shape[0]:
        grown = np.zeros((max(16, row * 3 // 2 + 1), matrix.shape[1]), dtype=matrix.dtype)
        grown[: matrix.shape[0]] = matrix
        matrix = grown
    matrix[row] = values
    return matrix

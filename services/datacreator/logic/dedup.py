"""De-duplication of accepted examples: exact, near (MinHash LSH) and semantic (embeddings).

The index keeps no texts. Per example it stores one uint16 row, num_perm + 8 wide (the low 16 bits
of each MinHash value, then the 16-byte digest of the normalised example), and 1 + bands entries
of a KeyTable filing the row number under 32 bits of the digest and under each LSH band key:
sorted uint32 arrays of keys and rows, 8 bytes an entry, with a dict for the latest additions.
An embedding row is kept as well when semantic dedup is on.

With 64 permutations (7 bands of 9 at the 0.85 threshold) that is 144 bytes of row (+6% of spare
rows on average) and 64 of keys, plus 0 to ~45 for entries waiting in the dict, depending on how
long ago it was merged: the curator benchmark measures 227 bytes per example over 79,270 examples,
where a set of digests, a uint32 signature matrix grown by half and a dict of band keys to Python
ints held 960.

Every row found under a key is verified, so a key met by chance costs a comparison, not a wrong
verdict: an exact duplicate is a stored digest equal to the example's, a near duplicate a stored
example sharing a band whose estimated Jaccard is >= the threshold. The bands and rows come from
datasketch's own optimiser.
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


_SHIFT = np.uint64(32)


class KeyTable:
    """A multimap of 32-bit keys to 32-bit values: sorted numpy arrays of keys and of their values,
    and a dict for the latest additions.

    An entry costs 8 bytes in the arrays and 70 to 95 in a dict of Python ints. Inserting into sorted
    arrays one entry at a time would copy them each time, so new entries wait in the dict until it
    holds `fraction` of what the arrays hold, then go in by one linear merge: each entry is copied
    about 1/fraction times in all, and the dict holds fraction/2 of the entries on average.
    """

    def __init__(self, fraction: float = 1 / 16, minimum: int = 4096) -> None:
        self._keys = np.zeros(0, dtype=np.uint32)
        self._values = np.zeros(0, dtype=np.uint32)
        self._recent: dict[int, int | list[int]] = {}
        self._pending = 0
        self._fraction = fraction
        self._minimum = minimum
        self._limit = minimum

    def __len__(self) -> int:
        return len(self._keys) + self._pending

    @property
    def merged(self) -> int:
        """Entries in the sorted arrays (the rest wait in the dict)."""
        return len(self._keys)

    def get(self, key: int) -> list[int]:
        found = _listed(self._recent.get(key))
        keys = self._keys
        if len(keys):
            # A numpy scalar: given an int, searchsorted would convert the whole array (see get_many).
            query = np.uint32(key)
            at = int(keys.searchsorted(query))
            if at < len(keys) and keys[at] == query:
                found.extend(self._values[at:int(keys.searchsorted(query, "right"))].tolist())
        return found

    def get_many(self, keys: Sequence[int]) -> list[int]:
        """Values filed under any of `keys`."""
        found: list[int] = []
        for hit in map(self._recent.get, keys):
            if hit is not None:
                found.extend(hit) if isinstance(hit, list) else found.append(hit)
        if len(self._keys):
            # The query is an array of the table's dtype: given Python ints, searchsorted would
            # convert the whole array to compare with them (~0.4 ms at 500k entries).
            query = np.array(keys, dtype=np.uint32)
            first = self._keys.searchsorted(query)
            # The smallest stored key >= each query key (wrapping past the end lands on a smaller
            # one): some query key is stored if and only if one of these is a query key.
            if not set(self._keys.take(first, mode="wrap").tolist()).isdisjoint(keys):
                found.extend(self._run(first, query))
        return found

    def get_each(self, keys: np.ndarray) -> list[list[int]]:
        """The values of each key of a uint32 array."""
        out = [_listed(hit) for hit in map(self._recent.get, keys.tolist())]
        if len(self._keys):
            first = self._keys.searchsorted(keys)
            for i in np.flatnonzero(self._keys.take(first, mode="wrap") == keys).tolist():
                out[i].extend(self._run(first[i:i + 1], keys[i:i + 1]))
        return out

    def _run(self, first: np.ndarray, query: np.ndarray) -> list[int]:
        """Values of the stored keys equal to `query`, which start at `first` (from a left search)."""
        last = self._keys.searchsorted(query, "right")
        found: list[int] = []
        for at, end in zip(first.tolist(), last.tolist()):
            if end > at:
                found.extend(self._values[at:end].tolist())
        return found

    def add(self, key: int, value: int) -> None:
        self.add_each((key,), value)

    def add_each(self, keys: Sequence[int], value: int) -> None:
        """File `value` under each of `keys`."""
        recent = self._recent
        for key in keys:
            hit = recent.get(key)
            if hit is None:
                recent[key] = value
            elif isinstance(hit, list):
                hit.append(value)
            else:
                recent[key] = [hit, value]
        self._pending += len(keys)
        if self._pending > self._limit:
            self.merge()

    def add_many(self, keys: np.ndarray, values: np.ndarray) -> None:
        """File `values[i]` under `keys[i]` (arrays); more than the dict may hold go straight into the arrays."""
        if self._pending + len(keys) > self._limit:
            self.merge(keys, values)
            return
        for key, value in zip(keys.tolist(), values.tolist()):
            self.add_each((key,), value)

    def merge(self, keys: np.ndarray | None = None, values: np.ndarray | None = None) -> None:
        """Move the dict's entries (and `keys`/`values`, if given) into the sorted arrays."""
        recent = self._recent
        if self._pending == len(recent):  # no key holds a list
            new_keys = np.fromiter(recent.keys(), dtype=np.uint32, count=len(recent))
            new_values = np.fromiter(recent.values(), dtype=np.uint32, count=len(recent))
        else:
            key_list: list[int] = []
            value_list: list[int] = []
            for key, hit in recent.items():
                if isinstance(hit, list):
                    key_list.extend([key] * len(hit))
                    value_list.extend(hit)
                else:
                    key_list.append(key)
                    value_list.append(hit)
            new_keys = np.array(key_list, dtype=np.uint32)
            new_values = np.array(value_list, dtype=np.uint32)
        if keys is not None and values is not None:
            new_keys = np.concatenate([new_keys, keys.astype(np.uint32, copy=False)])
            new_values = np.concatenate([new_values, values.astype(np.uint32, copy=False)])
        order = np.argsort(new_keys)  # the order of values under one key does not matter
        new_keys, new_values = new_keys[order], new_values[order]
        # Where each new entry lands in the merged arrays; the old ones fill the other places in order.
        at = self._keys.searchsorted(new_keys, "right") + np.arange(len(new_keys))
        old = np.ones(len(self._keys) + len(new_keys), dtype=bool)
        old[at] = False
        merged_keys = np.empty(len(old), dtype=np.uint32)
        merged_keys[at] = new_keys
        merged_keys[old] = self._keys
        merged_values = np.empty(len(old), dtype=np.uint32)
        merged_values[at] = new_values
        merged_values[old] = self._values
        self._keys, self._values = merged_keys, merged_values
        self._recent = {}
        self._pending = 0
        self._limit = max(self._minimum, int(len(merged_keys) * self._fraction))


def _listed(hit: int | list[int] | None) -> list[int]:
    """A KeyTable dict entry as a new list of its values."""
    return [] if hit is None else list(hit) if isinstance(hit, list) else [hit]


def _low16(signatures: np.ndarray) -> np.ndarray:
    # b-bit MinHash (Li & König): two different minima share their low 16 bits with probability
    # 2^-16 (the multiplier is odd, so the low bits of a*h+b depend on the low bits of h only), which
    # lifts an estimated Jaccard by (1 - J) / 65536 on average, less than one permutation in 1,000
    # verified pairs. The high bits would not do: those of a minimum crowd towards zero. Band keys
    # are computed from the full 32-bit values, so the LSH finds the same candidates as before.
    return (signatures & np.uint32(0xFFFF)).astype(np.uint16)


def _exact_key(digest: bytes) -> int:
    return int.from_bytes(digest[:4], "little")


def _holds_digest(stored: np.ndarray, digest: bytes) -> bool:
    """Whether one of the stored digest rows (8 uint16 columns each) is `digest`."""
    blob = stored.tobytes()
    return digest in {blob[i:i + 16] for i in range(0, len(blob), 16)}


@dataclass(slots=True)
class Fingerprint:
    """What the index needs to know about one example, computed once."""

    normalised: str
    digest: bytes  # 16 bytes
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
        self._count = 0
        self._hasher = MinHasher(num_perm) if near_threshold is not None else None
        self._bands, self._rows = lsh_params(near_threshold, num_perm) if near_threshold is not None else (0, 0)
        # One table for every key of a row: 32 bits of its digest, and its LSH band keys (salted
        # per band). A key met by chance only adds a row to verify against the stored digest or
        # signature, so 32 bits are enough (8 keys x n rows / 2^32 such rows per check: 0.02% at 100k).
        self._table = KeyTable()
        gen = np.random.RandomState(7)
        self._band_mix = gen.randint(1, 1 << 62, (self._bands, self._rows), dtype=np.uint64) | np.uint64(1)
        self._band_salt = gen.randint(1, 1 << 62, self._bands, dtype=np.uint64)
        # One row per example: the low 16 bits of each MinHash value (see _low16), then the digest.
        self._width = num_perm if self._hasher is not None else 0
        self._stored = np.zeros((0, self._width + 8), dtype=np.uint16)
        self._vectors: np.ndarray | None = None
        self._checked: tuple[bytes, int] | None = None  # the last digest `check` found new, at which size

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
            signatures = self._hasher.signatures(texts)
            # Band keys for the whole batch in one numpy pass: one at a time they cost more than the lookups.
            keys = self._band_keys(signatures).tolist()
            for fp, row, row_keys, empty in zip(prints, signatures, keys, (signatures[:, 0] == _EMPTY_ROW).tolist()):
                fp.signature = row
                if not empty:
                    fp.band_keys = row_keys
        if self.semantic_threshold is not None and self.embedder is not None:
            for fp, vector in zip(prints, np.asarray(self.embedder.embed(texts), dtype=np.float32)):
                fp.vector = vector
        return prints

    def fingerprint(self, item: Any) -> Fingerprint:
        return self.fingerprints([item])[0]

    def check(self, item: Any) -> RejectReason | None:
        """duplicate / near_duplicate / semantic_duplicate, or None when the example is new."""
        fp = item if isinstance(item, Fingerprint) else self.fingerprint(item)
        if not self._count:
            return None
        signature = fp.signature
        near = self._hasher is not None and signature is not None and signature.item(0) != _EMPTY_ROW
        keys = [_exact_key(fp.digest)]
        if near and signature is not None:
            if fp.band_keys is None:
                fp.band_keys = self._band_keys(signature).tolist()
            keys += fp.band_keys
        # Stored examples sharing the digest's key or an LSH band.
        rows = self._table.get_many(keys) if near else self._table.get(keys[0])
        if rows:
            stored = self._stored[rows]
            if _holds_digest(stored[:, self._width:], fp.digest):
                return RejectReason.duplicate
            if near and signature is not None and self.near_threshold is not None:
                agree = int((stored[:, :self._width] == _low16(signature)).sum(axis=1).max())
                if agree / self._width >= self.near_threshold:  # the same float as the mean of the best row
                    return RejectReason.near_duplicate
        self._checked = (fp.digest, self._count)
        if self._vectors is not None and fp.vector is not None:
            cosines = self._vectors[: self._count] @ fp.vector
            if self.semantic_threshold is not None and float(cosines.max()) >= self.semantic_threshold:
                return RejectReason.semantic_duplicate
        return None

    def _holds(self, digest: bytes) -> bool:
        """Whether an example with this digest is stored."""
        if self._checked == (digest, self._count):  # `add` after `check` of the same example
            return False
        rows = self._table.get(_exact_key(digest))
        return bool(rows) and _holds_digest(self._stored[rows, self._width:], digest)

    def resembles(self, fp: Fingerprint, others: Sequence[Fingerprint]) -> bool:
        """Whether `fp` is a near-duplicate of any of `others` (compared directly, not indexed)."""
        if self._hasher is None or fp.signature is None or fp.signature.item(0) == _EMPTY_ROW:
            return False
        assert self.near_threshold is not None
        # count / size is the float .mean() returns, at a fifth of its cost.
        return any(
            o.signature is not None and np.count_nonzero(o.signature == fp.signature) / fp.signature.size >= self.near_threshold
            for o in others
        )

    def add(self, item: Any, key: Any = None) -> None:
        """Remember an accepted example. `key` is not stored: rows are numbered internally."""
        fp = item if isinstance(item, Fingerprint) else self.fingerprint(item)
        if self._holds(fp.digest):
            return
        row = self._count
        self._count += 1
        if row >= self._stored.shape[0]:
            self._stored = _grow(self._stored, row + 1)
        stored = self._stored[row]
        stored[self._width:] = np.frombuffer(fp.digest, dtype=np.uint16)
        keys = [_exact_key(fp.digest)]
        if self._hasher is not None:
            signature = fp.signature if fp.signature is not None else self._hasher.signatures([""])[0]
            stored[:self._width] = signature  # the assignment keeps the low 16 bits, as _low16 does
            if signature.item(0) != _EMPTY_ROW:
                keys += fp.band_keys if fp.band_keys is not None and fp.signature is signature else self._band_keys(signature).tolist()
        self._table.add_each(keys, row)
        if self.semantic_threshold is not None and fp.vector is not None:
            if self._vectors is None:
                self._vectors = np.zeros((max(16, row + 1), fp.vector.shape[0]), dtype=np.float32)
            self._vectors = _grow(self._vectors, row + 1)
            self._vectors[row] = fp.vector

    def add_many(self, prints: Sequence[Fingerprint]) -> None:
        """`add` for many fingerprints at once (a restore): keys, rows and lookups in numpy passes."""
        if not prints:
            return
        digests = np.frombuffer(b"".join(fp.digest for fp in prints), dtype=np.uint16).reshape(len(prints), 8)
        exact_keys = np.frombuffer(b"".join(fp.digest[:4] for fp in prints), dtype="<u4").astype(np.uint32)
        fresh: list[Fingerprint] = []
        picked: list[int] = []
        seen: set[bytes] = set()
        for i, candidates in enumerate(self._table.get_each(exact_keys)):
            fp = prints[i]
            if fp.digest in seen:
                continue
            if candidates and _holds_digest(self._stored[candidates, self._width:], fp.digest):
                continue
            seen.add(fp.digest)
            fresh.append(fp)
            picked.append(i)
        if not fresh:
            return
        if self.semantic_threshold is not None and any(fp.vector is not None for fp in fresh):
            for fp in fresh:
                self.add(fp)
            return
        first = self._count
        self._count += len(fresh)
        self._stored = _grow(self._stored, self._count)
        self._stored[first:self._count, self._width:] = digests[picked]
        rows = np.arange(first, self._count, dtype=np.uint32)
        keys: list[np.ndarray] = [exact_keys[picked]]
        values: list[np.ndarray] = [rows]
        if self._hasher is not None:
            empty = self._hasher.signatures([""])[0]
            signatures = np.stack([fp.signature if fp.signature is not None else empty for fp in fresh])
            self._stored[first:self._count, :self._width] = _low16(signatures)
            live = np.flatnonzero(signatures[:, 0] != _EMPTY_ROW)
            keys.append(self._band_keys(signatures[live]).ravel())
            values.append(np.repeat(rows[live], self._bands))
        self._table.add_many(np.concatenate(keys), np.concatenate(values))

    def _band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """Band keys (uint32) of one signature, or of each row of a matrix of them."""
        lead = signatures.shape[:-1]
        bands = signatures[..., : self._bands * self._rows].astype(np.uint64).reshape(*lead, self._bands, self._rows)
        keys = (bands * self._band_mix).sum(axis=-1, dtype=np.uint64) + self._band_salt  # wraps: arrays do not warn
        return (keys >> _SHIFT).astype(np.uint32)  # the best mixed bits


def _grow(matrix: np.ndarray, rows: int) -> np.ndarray:
    """`matrix` with room for `rows` rows. It grows by an eighth: the spare rows held are ~6% on
    average (against ~23% when growing by half), and each row is copied about 8 times in all."""
    if rows <= matrix.shape[0]:
        return matrix
    grown = np.zeros((max(rows, matrix.shape[0] + max(matrix.shape[0] // 8, 256)), matrix.shape[1]), dtype=matrix.dtype)
    grown[: matrix.shape[0]] = matrix
    return grown

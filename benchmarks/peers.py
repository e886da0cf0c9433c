"""The tools people use today, pointed at the same simulator as datacreator.

- `baseline`: a plain asyncio + httpx client of the kind the OpenAI cookbook's parallel request
  processor describes: request and token capacity that refills at limit/window per second (up to
  the limit), a pause after a 429 (15 s per 60 s window, scaled to the window), retries of failed
  calls, and a cap on concurrent calls. It keeps the distinct answers (exact dedup) until it has
  the number of examples asked for.
- `curator`: Bespoke Curator (`bespokelabs-curator`) driving the same prompts, from a virtualenv
  of its own (never the project's).

Each runs in a child process and prints one JSON line of results:

    python benchmarks/peers.py baseline CONFIG.json
    /tmp/curator-venv/bin/python benchmarks/peers.py curator CONFIG.json

Only the standard library is imported at module level: the Curator venv has none of datacreator.
"""

from __future__ import annotations

import asyncio
import glob
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

CURATOR_PYTHON = os.environ.get("DATACREATOR_CURATOR_PYTHON", "/tmp/curator-venv/bin/python")


def _item_key(item: dict[str, Any]) -> str:
    return json.dumps(item, sort_keys=True, separators=(",", ":")).lower()


def _items(content: str) -> list[dict[str, Any]]:
    """The examples of one answer: {"examples": [...]} (or a bare list), dict items only."""
    try:
        parsed = json.loads(content)
    except (json.JSONDecodeError, TypeError):
        return []
    if isinstance(parsed, dict):
        parsed = parsed.get("examples", [parsed])
    return [item for item in parsed if isinstance(item, dict)] if isinstance(parsed, list) else []


# ---------------------------------------------------------------------------------------------
# The baseline client


@dataclass
class _Capacity:
    """Request and token capacity, refilled continuously (the cookbook's StatusTracker)."""

    rpm: float | None
    tpm: float | None
    window_s: float
    requests: float = 0.0
    tokens: float = 0.0
    updated: float = field(default_factory=time.monotonic)
    last_429: float = -math.inf

    def __post_init__(self) -> None:
        self.requests = self.rpm or 0.0
        self.tokens = self.tpm or 0.0

    def take(self, tokens: int) -> bool:
        now = time.monotonic()
        elapsed, self.updated = now - self.updated, now
        if self.rpm:
            self.requests = min(self.rpm, self.requests + self.rpm * elapsed / self.window_s)
        if self.tpm:
            self.tokens = min(self.tpm, self.tokens + self.tpm * elapsed / self.window_s)
        if (self.rpm and self.requests < 1) or (self.tpm and self.tokens < tokens):
            return False
        self.requests -= 1 if self.rpm else 0
        self.tokens -= tokens if self.tpm else 0
        return True


async def run_baseline(config: dict[str, Any]) -> dict[str, Any]:
    import httpx

    target, per_call = config["target"], config["examples_per_call"]
    window_s = config.get("window_s", 60.0)
    pause_s = 15.0 * window_s / 60.0
    capacity = _Capacity(config.get("rpm"), config.get("tpm"), window_s)
    body = json.dumps({
        "model": config.get("model", "default"), "messages": config["messages"], "temperature": 1.0,
        "max_tokens": config["max_tokens"], "response_format": {"type": "json_object"},
    }).encode()
    seen: set[str] = set()
    counts = {"calls": 0, "ok": 0, "429": 0, "failed": 0}
    in_flight = 0
    slots = asyncio.Semaphore(config["concurrency"])
    retry_queue: list[int] = []
    limits = httpx.Limits(max_connections=config["concurrency"], max_keepalive_connections=config["concurrency"])
    async with httpx.AsyncClient(base_url=config["base_url"].rstrip("/") + "/", timeout=120, limits=limits,
                                 headers={"content-type": "application/json"}) as http:

        async def call(attempts_left: int) -> None:
            nonlocal in_flight
            try:
                counts["calls"] += 1
                try:
                    response = await http.post("chat/completions", content=body)
                except httpx.HTTPError:
                    response = None
                if response is not None and response.status_code == 200:
                    counts["ok"] += 1
                    content = response.json()["choices"][0]["message"]["content"]
                    for item in _items(content):
                        seen.add(_item_key(item))
                    return
                if response is not None and response.status_code == 429:
                    counts["429"] += 1
                    capacity.last_429 = time.monotonic()
                if attempts_left > 1:
                    retry_queue.append(attempts_left - 1)
                else:
                    counts["failed"] += 1
            finally:
                in_flight -= 1
                slots.release()

        started = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        while len(seen) < target:
            if len(seen) + in_flight * per_call >= target and not retry_queue:
                await asyncio.sleep(0.001)
                continue
            await slots.acquire()
            while not capacity.take(config["call_tokens"]):
                await asyncio.sleep(0.001)  # the cookbook polls its capacity every millisecond
            wait = capacity.last_429 + pause_s - time.monotonic()
            if wait > 0:  # cool down after a 429
                await asyncio.sleep(wait)
            attempts = retry_queue.pop() if retry_queue else config.get("max_attempts", 5)
            in_flight += 1
            task = asyncio.create_task(call(attempts))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        wall = time.monotonic() - started
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"examples": len(seen), "wall_s": wall, **counts}


# ---------------------------------------------------------------------------------------------
# Bespoke Curator (inside its own venv)


def run_curator_inside(config: dict[str, Any]) -> dict[str, Any]:
    from bespokelabs import curator

    class Generate(curator.LLM):
        def prompt(self, row: dict[str, Any]) -> list[dict[str, str]]:
            return row["messages"]

        def parse(self, row: dict[str, Any], response: Any) -> list[dict[str, Any]]:
            return [{"example": json.dumps(item, sort_keys=True)} for item in _items(response)]

    backend_params: dict[str, Any] = {
        "base_url": config["base_url"], "api_key": "sk-local-simulator",
        "max_requests_per_minute": config["rpm_per_minute"], "max_tokens_per_minute": config["tpm_per_minute"],
        "max_concurrent_requests": config["concurrency"], "max_retries": 5, "require_all_responses": False,
        "seconds_to_pause_on_rate_limit": config["pause_s"], "request_timeout": 120,
    }
    llm = Generate(model_name="gpt-4o-mini", backend="openai",
                   generation_params={"max_tokens": config["max_tokens"], "temperature": 1.0}, backend_params=backend_params)
    rows = [{"i": i, "messages": config["messages"]} for i in range(config["calls"])]
    started = time.monotonic()
    response = llm(rows)
    wall = time.monotonic() - started
    dataset = response.dataset if hasattr(response, "dataset") else response
    distinct = {row["example"].lower() for row in dataset}
    return {"examples": len(distinct), "rows": len(dataset), "wall_s": wall}


def curator_environment(cache_dir: str) -> dict[str, str]:
    """Offline: tiktoken's cl100k file from the copy litellm ships, no telemetry, no cache reuse."""
    env = {**os.environ, "CURATOR_CACHE_DIR": cache_dir, "CURATOR_DISABLE_CACHE": "true", "TELEMETRY_ENABLED": "false",
           "CURATOR_DISABLE_RICH_DISPLAY": "1", "OPENAI_API_KEY": "sk-local-simulator", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    prefix = os.path.dirname(os.path.dirname(CURATOR_PYTHON))
    found = glob.glob(os.path.join(prefix, "lib", "python*", "site-packages", "litellm", "litellm_core_utils", "tokenizers"))
    if found:
        env["TIKTOKEN_CACHE_DIR"] = found[0]
    return env


def curator_available() -> str | None:
    """None when Curator can run here, else why not."""
    if not os.path.exists(CURATOR_PYTHON):
        return (f"no Curator venv at {CURATOR_PYTHON} (python -m venv /tmp/curator-venv && "
                "/tmp/curator-venv/bin/pip install bespokelabs-curator)")
    probe = subprocess.run([CURATOR_PYTHON, "-c", "import bespokelabs.curator"], capture_output=True, text=True,
                           env=curator_environment(tempfile.gettempdir()), timeout=120)
    if probe.returncode:
        return f"bespokelabs-curator does not import: {probe.stderr.strip().splitlines()[-1:]}"
    return None


# ---------------------------------------------------------------------------------------------
# Running a peer in a child process


def run_peer(kind: str, config: dict[str, Any], timeout_s: float = 600) -> dict[str, Any]:
    """Run `baseline` (this venv) or `curator` (its own venv) in a child process; its JSON result."""
    python = sys.executable if kind == "baseline" else CURATOR_PYTHON
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as workdir:
        path = os.path.join(workdir, "config.json")
        with open(path, "w") as handle:
            json.dump(config, handle)
        env = curator_environment(os.path.join(workdir, "cache")) if kind == "curator" else dict(os.environ)
        done = subprocess.run([python, os.path.abspath(__file__), kind, path], capture_output=True, text=True,
                              env=env, cwd=workdir, timeout=timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{\"result\"")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{kind} failed (exit {done.returncode}): {' | '.join(tail)}")
    return json.loads(lines[-1])["result"]


def main(argv: list[str]) -> int:
    kind, path = argv[0], argv[1]
    with open(path) as handle:
        config = json.load(handle)
    if kind == "baseline":
        result = asyncio.run(run_baseline(config))
    elif kind == "curator":
        result = run_curator_inside(config)
    else:
        raise SystemExit(f"unknown peer {kind!r}")
    sys.stdout.write(json.dumps({"result": result}) + "\n")
    sys.stdout.flush()
    return 0



def cli() -> int:
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(cli())

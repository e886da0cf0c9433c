"""Speed of the embedded llama.cpp server under different settings, side by side.

Each configuration starts its own server on the default model, sends the same multiple-choice
calls (the prompt and schema the generator sends) and records seconds per call, generated tokens
per second and the share of valid, new items. Configurations alternate over `--repeat` rounds so
that the shared machine's load falls on all of them alike; ratios are against the first.

    python -m benchmarks.embedded_speed --calls 2 --examples-per-call 5 --repeat 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from types import SimpleNamespace
from typing import Any

import httpx

from benchmarks.common import print_side_by_side
from datacreator.llm.embedded import DEFAULT_MODEL, EmbeddedLLM
from datacreator.logic.parsing import parse_examples
from datacreator.logic.prompt import SYSTEM_PROMPT, build_user_prompt
from datacreator.logic.shape import batch_schema, example_schema

REQUEST = "examples/requests/multiple_choice.json"

# name -> (n_threads or None for the default, extra server arguments, structured output, environment)
LOOKUP = ("--draft_model", "prompt-lookup-decoding", "--draft_model_num_pred_tokens", "10")
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
CONFIGS: dict[str, tuple[int | None, tuple[str, ...], str, dict[str, str]]] = {
    "default": (None, (), "json_schema", {}),
    "threads=1": (1, (), "json_schema", {}),
    "threads=2": (2, (), "json_schema", {}),
    "threads=2, OpenMP passive": (2, (), "json_schema", PASSIVE),
    "prompt lookup": (None, LOOKUP, "json_schema", {}),
    "threads=2, prompt lookup": (2, LOOKUP, "json_schema", {}),
    "threads=2, passive, prompt lookup": (2, LOOKUP, "json_schema", PASSIVE),
    "no grammar (json_object)": (None, (), "json_object", {}),
    "unconstrained": (None, (), "none", {}),
    "threads=2, unconstrained": (2, (), "none", {}),
    "threads=2, unconstrained, prompt lookup": (2, LOOKUP, "none", {}),
    "cache=ram": (None, ("--cache", "true"), "json_schema", {}),
    "flash_attn": (None, ("--flash_attn", "true"), "json_schema", {}),
    "n_batch=128": (None, ("--n_batch", "128", "--n_ubatch", "128"), "json_schema", {}),
    "n_ctx=2048": (None, ("--n_ctx", "2048"), "json_schema", {}),
}


def _task(request: dict[str, Any], n: int) -> SimpleNamespace:
    return SimpleNamespace(
        instruction=request["instruction"],
        references=[SimpleNamespace(data=request["formatting_example"])],
        num_examples=n,
        label_space=None,
        label_field=None,
    )


def _valid(item: Any, example: dict[str, Any]) -> bool:
    if not isinstance(item, dict) or set(item) != set(example):
        return False
    options = item.get("options")
    return (isinstance(item.get("question"), str) and isinstance(options, dict)
            and sorted(options) == ["A", "B", "C", "D"] and item.get("answer") in options)


async def _run_config(name: str, request: dict[str, Any], calls: int, n: int) -> dict[str, Any]:
    threads, extra, mode, env = CONFIGS[name]
    llm = EmbeddedLLM(DEFAULT_MODEL, n_threads=threads, server_args=extra)
    started = time.monotonic()
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the server is started with this process's environment
    try:
        await llm.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    load_s = time.monotonic() - started
    example = request["formatting_example"]
    seen = {json.dumps(example, sort_keys=True)}
    valid_new = items = tokens = 0
    seconds: list[float] = []
    try:
        async with httpx.AsyncClient(timeout=600) as http:
            for _ in range(calls):
                body: dict[str, Any] = {
                    "model": llm.model_alias,
                    "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                 {"role": "user", "content": build_user_prompt(_task(request, n))}],
                    "temperature": 1.0,
                }
                if mode == "json_schema":
                    body["response_format"] = {"type": "json_schema", "json_schema": {
                        "name": "examples", "schema": batch_schema(example_schema(example), n)}}
                elif mode == "json_object":
                    body["response_format"] = {"type": "json_object"}
                t0 = time.monotonic()
                response = await http.post(f"{llm.base_url}/chat/completions", json=body)
                seconds.append(time.monotonic() - t0)
                answer = response.json()
                tokens += answer.get("usage", {}).get("completion_tokens", 0)
                try:
                    content = answer["choices"][0]["message"]["content"]
                except (KeyError, IndexError, TypeError):
                    content = None
                # The curator's own parser, so an unconstrained answer (fences, prose) counts as it would.
                for item in parse_examples(content, example.keys()).items:
                    items += 1
                    key = json.dumps(item, sort_keys=True)
                    if _valid(item, example) and key not in seen:
                        valid_new += 1
                    seen.add(key)
    finally:
        await llm.stop()
    total = sum(seconds)
    return {"config": name, "load_s": load_s, "s_per_call": statistics.mean(seconds),
            "tok_per_s": tokens / total if total else 0.0, "s_per_valid_new": total / valid_new if valid_new else None,
            "valid_new_share": valid_new / (calls * n)}


async def _main(args: argparse.Namespace) -> list[dict[str, Any]]:
    with open(args.request) as f:
        request = json.load(f)
    rows: list[dict[str, Any]] = []
    for round_ in range(args.repeat):
        for name in args.configs:
            row = await _run_config(name, request, args.calls, args.examples_per_call)
            row["round"] = round_
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--calls", type=int, default=2, help="calls per configuration and round")
    parser.add_argument("--examples-per-call", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2, help="rounds, configurations alternating")
    parser.add_argument("--request", default=REQUEST)
    args = parser.parse_args(argv)
    print(f"load: {os.getloadavg()}", flush=True)
    rows = asyncio.run(_main(args))
    print_side_by_side(rows, "config", args.configs, "s_per_call", [
        ("s/call", "s_per_call", ".1f"), ("tok/s", "tok_per_s", ".1f"), ("valid+new", "valid_new_share", ".0%")])


def cli() -> int:
    main()
    return 0


if __name__ == "__main__":
    main()

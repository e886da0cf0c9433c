"""The README's first command on the embedded LLM with servers x threads layouts, side by side.

Each round runs `datacreator run examples/requests/multiple_choice.json --llm-servers S
--llm-threads T` once per layout SxT, alternating, so that the shared machine's load falls on every layout alike; the figure is the
command's own wall time from its summary (the stack's start included), and ratios are against the
first layout. Completion tokens per second count what every server wrote together.

    python -m benchmarks embedded_servers --layouts 1x1 1x2 2x1 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import print_side_by_side

ROOT = Path(__file__).resolve().parent.parent
REQUEST = "examples/requests/multiple_choice.json"


def _run(layout: str, request: str, model: str | None) -> dict[str, Any]:
    servers, threads = map(int, layout.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "datacreator.cli", "run", request, "--llm-servers", str(servers), "--llm-threads", str(threads),
               "--out", str(Path(tmp) / "rows.jsonl"), "--quiet"]
        if model:
            cmd += ["--model", model]
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        elapsed = time.monotonic() - started
    out = done.stdout
    if done.returncode != 0:
        raise SystemExit(f"datacreator run with {layout} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    wall = float(re.search(r"wall time\s+([\d.]+) s", out).group(1))  # type: ignore[union-attr]
    prompt, completion = map(int, re.search(r"tokens\s+(\d+) prompt \+ (\d+) completion", out).groups())  # type: ignore[union-attr]
    accepted = int(re.search(r"accepted\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    calls = int(re.search(r"llm calls\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    return {"layout": layout, "wall_s": wall, "process_s": elapsed, "accepted": accepted, "calls": calls,
            "prompt_tokens": prompt, "completion_tokens": completion, "completion_tok_per_s": completion / wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["1x1", "1x2", "2x1"], help="SERVERSxTHREADS each")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, layouts alternating")
    parser.add_argument("--request", default=REQUEST)
    parser.add_argument("--model", help="embedded model (default: the default model)")
    args = parser.parse_args(argv)
    print(f"load: {os.getloadavg()}, cores: {len(os.sched_getaffinity(0))}", flush=True)
    rows = []
    for round_ in range(args.repeat):
        order = args.layouts if round_ % 2 == 0 else list(reversed(args.layouts))
        for layout in order:
            row = _run(layout, args.request, args.model)
            row["round"] = round_
            print(row, flush=True)
            rows.append(row)
    print_side_by_side(rows, "layout", args.layouts, "wall_s", [
        ("wall s", "wall_s", ".1f"), ("calls", "calls", ".1f"), ("completion tok/s, all servers", "completion_tok_per_s", ".1f")])


def cli() -> int:
    main()
    return 0


if __name__ == "__main__":
    main()

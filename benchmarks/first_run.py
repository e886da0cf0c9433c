"""A newcomer's first run, timed: the README's first command on a fresh clone with empty caches.

Clones this repository (its HEAD) into a temporary folder and runs, there, what the README's
first command runs: `bash install.sh`, then `.venv/bin/datacreator run
examples/requests/multiple_choice.json`. pip's cache, the llama.cpp wheel cache and the model cache
point at empty temporary folders, so every download and the compile happen as on a new machine
(the system's Python, compilers and Debian packages are what they are). Prints each step's
seconds as install.sh reports them, the run's own summary, and writes results.json with
`first_run_s` (install + run) and `embedded_examples_per_min` (the run's accepted examples per
minute, its LLM startup included).

    python -m benchmarks first_run                 # about 5-10 minutes on 2 cores
    python -m benchmarks first_run --keep-caches   # an install with this machine's caches
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.results import write_results

ROOT = Path(__file__).resolve().parents[1]
REQUEST = "examples/requests/multiple_choice.json"
_STEP = re.compile(r"^\[install (\d+)s\] (.*)$")


def _timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, echo: bool) -> tuple[float, int, str]:
    started = time.monotonic()
    out: list[str] = []
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            out.append(line)
            if echo:
                print("   ", line.rstrip(), flush=True)
        code = proc.wait()
    return time.monotonic() - started, code, "".join(out)


def first_run(keep_caches: bool, work: Path, timeout_s: float) -> dict[str, Any]:
    clone = work / "datacreator"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "DATACREATOR_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    if not keep_caches:
        for name, var in (("pip", "PIP_CACHE_DIR"), ("wheels", "DATACREATOR_WHEEL_CACHE"), ("models", "DATACREATOR_MODEL_CACHE")):
            (work / name).mkdir()
            env[var] = str(work / name)
    print(f"first run in {clone} ({'this machine' if keep_caches else 'empty'} caches), load {os.getloadavg()[0]:.2f}", flush=True)
    install_s, code, text = _timed(["bash", "install.sh"], clone, env, work / "install.out", echo=True)
    if code != 0:
        raise SystemExit(f"install.sh failed with exit code {code}; its output is in {work / 'install.out'}")
    steps = [(int(m.group(1)), m.group(2)) for m in map(_STEP.match, text.splitlines()) if m]
    out_file = work / "examples.jsonl"
    cmd = [str(clone / ".venv" / "bin" / "datacreator"), "run", REQUEST, "--out", str(out_file), "--timeout", str(int(timeout_s))]
    run_s, code, text = _timed(cmd, clone, env, work / "run.out", echo=True)
    if code != 0:
        raise SystemExit(f"datacreator run failed with exit code {code}; its output is in {work / 'run.out'}")
    accepted = sum(1 for line in out_file.read_text().splitlines() if line.strip())
    return {"install_s": install_s, "run_s": run_s, "first_run_s": install_s + run_s, "accepted": accepted,
            "install_steps": steps, "empty_caches": not keep_caches, "load_1m_end": os.getloadavg()[0]}


def cli() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks first_run", description=__doc__.splitlines()[0])
    parser.add_argument("--keep-caches", action="store_true", help="use this machine's pip, wheel and model caches")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the run may take (default: %(default)s)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "first_run.json"), help="results.json to write")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone (its path is printed)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="datacreator-first-run-"))
    try:
        result = first_run(args.keep_caches, work, args.timeout)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    per_min = result["accepted"] / result["run_s"] * 60 if result["run_s"] else None
    print(f"\ninstall {result['install_s']:.0f} s + first command {result['run_s']:.0f} s = {result['first_run_s']:.0f} s "
          f"(goal 300 s); {result['accepted']} examples, {per_min:.1f}/min with the LLM's startup")
    write_results(args.results, {"first_run_s": result["first_run_s"], "embedded_examples_per_min": per_min}, ["first_run"],
                  {"first_run": result}, {"cores": os.cpu_count(), "python": sys.version.split()[0]})
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())

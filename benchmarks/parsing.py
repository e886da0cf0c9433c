"""Salvage of truncated model output: the parser before and after the linear-time rewrite.

Prints, for answers of growing size, the seconds each version needs to salvage them, side by
side. The "before" version is read from git (the commit before the rewrite), so the comparison
runs on the same machine and input.

    PYTHONPATH=services python benchmarks/parsing.py [--sizes 13,26,54,130,1024] [--old-ref REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from datacreator.logic import parsing as new_parsing

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("question", "options", "answer")


def degenerate(kb: int) -> str:
    """A model stuck repeating the fields of one object, cut off mid-answer (no wrapper list)."""
    unit = '"question": "Which of these is a fruit, and why?", "options": ["apple", "brick"], "answer": "A", '
    return "{" + unit * (kb * 1024 // len(unit)) + '"question": "Which'


def truncated_batch(kb: int) -> str:
    """A well-formed batch under a wrapper key, cut off mid-item."""
    item = '{"question": "Which of these is a fruit?", "options": {"A": "apple", "B": "brick"}, "answer": "A"}, '
    return '{"examples": [' + item * (kb * 1024 // len(item)) + '{"question": "Wh'


def load_old(ref: str):
    source = subprocess.run(["git", "show", f"{ref}:services/datacreator/logic/parsing.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "parsing_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("parsing_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["parsing_old"] = module  # dataclasses look their module up
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def timed(fn, text: str) -> tuple[float, int]:
    started = time.perf_counter()
    result = fn(text, KEYS)
    elapsed = time.perf_counter() - started
    return elapsed, len(result.items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="13,26,54,130,1024", help="answer sizes in KB")
    parser.add_argument("--old-ref", default="1ea0606", help="git revision of the parser before the rewrite")
    parser.add_argument("--old-limit-s", type=float, default=20.0, help="skip the old parser on larger sizes once one run takes this long")
    args = parser.parse_args()
    old = load_old(args.old_ref)
    print(f"{'input':<16} {'KB':>6} {'before s':>10} {'after s':>10} {'ratio':>8}  items before/after")
    for name, make in (("degenerate", degenerate), ("truncated batch", truncated_batch)):
        skip_old = False
        for kb in (int(x) for x in args.sizes.split(",")):
            text = make(kb)
            new_s, new_items = timed(new_parsing.parse_examples, text)
            if skip_old:
                print(f"{name:<16} {kb:>6} {'(skipped)':>10} {new_s:>10.4f} {'':>8}  -/{new_items}")
                continue
            old_s, old_items = timed(old.parse_examples, text)
            skip_old = old_s > args.old_limit_s / 4
            print(f"{name:<16} {kb:>6} {old_s:>10.4f} {new_s:>10.4f} {old_s / new_s:>7.0f}x  {old_items}/{new_items}")
            sys.stdout.flush()


def cli() -> int:
    main()
    return 0


if __name__ == "__main__":
    main()

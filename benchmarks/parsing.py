"""Salvage of truncated and messy model output: three versions of the parser side by side.

Prints, for answers of growing size, the seconds each version needs: `quadratic` (the first
parser, searching back from the segment's start for each key), `python scan` (linear, but a
Python step per string and bracket) and `now` (C-speed regex passes, one orjson call per run of
items). The old versions are read from git, so all run on the same machine and input. Times are
CPU seconds of this process (the best of `--repeat` runs): on a shared machine wall time mostly
measures the neighbours.

    python -m benchmarks parsing [--sizes 13,130,1024] [--quadratic-ref REV] [--scan-ref REV]
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


def long_strings(kb: int) -> str:
    """Items whose strings are long and full of escapes and brackets, cut off mid-string."""
    item = '{"question": "' + 'a \\"quoted\\" {brace} [bracket], ' * 60 + '", "options": {"A": "x", "B": "y"}, "answer": "A"}, '
    return "[" + item * max(1, kb * 1024 // len(item)) + '{"question": "' + "never closed " * 40


def many_fragments(kb: int) -> str:
    """JSON lines with prose and one broken line among them: many small closed segments."""
    line = '{"question": "Which?", "options": {"A": "a", "B": "b"}, "answer": "A"}\n'
    count = kb * 1024 // len(line)
    return "Here you go:\n" + line * (count // 2) + '{"question": "broken" "answer": "A"}\n' + line * (count // 2) + "Done."


def brace_garbage(kb: int) -> str:
    """Brackets and braces with no JSON in them, and prose."""
    unit = "{[ see (a) ] and {b}: [c, {d] } "
    return unit * (kb * 1024 // len(unit))


INPUTS = (("degenerate", degenerate), ("truncated batch", truncated_batch), ("long strings", long_strings),
          ("many fragments", many_fragments), ("brace garbage", brace_garbage))


def load_old(ref: str, name: str = "parsing_old"):
    source = subprocess.run(["git", "show", f"{ref}:services/datacreator/logic/parsing.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def timed(fn, text: str, repeat: int = 1) -> tuple[float, int]:
    best, items = float("inf"), 0
    for _ in range(repeat):
        started = time.process_time()
        result = fn(text, KEYS)
        best = min(best, time.process_time() - started)
        items = len(result.items)
    return best, items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="13,130,1024", help="answer sizes in KB")
    parser.add_argument("--quadratic-ref", default="1ea0606", help="git revision of the first parser")
    parser.add_argument("--scan-ref", default="b03c9d4", help="git revision of the parser with a Python step per token")
    parser.add_argument("--repeat", type=int, default=3, help="runs per input; the best is shown")
    parser.add_argument("--old-limit-s", type=float, default=5.0, help="skip an old parser on larger sizes once one run takes this long")
    args = parser.parse_args(argv)
    versions = [("quadratic", load_old(args.quadratic_ref, "parsing_quadratic").parse_examples),
                ("python scan", load_old(args.scan_ref, "parsing_scan").parse_examples)]
    print(f"{'input':<16} {'KB':>5} {'quadratic s':>12} {'python scan s':>14} {'now s':>8} {'scan/now':>9}  items quadratic/scan/now")
    for name, make in INPUTS:
        skip = {label: False for label, _ in versions}
        for kb in (int(x) for x in args.sizes.split(",")):
            text = make(kb)
            now_s, now_items = timed(new_parsing.parse_examples, text, args.repeat)
            cells, counts = [], []
            for label, fn in versions:
                if skip[label]:
                    cells.append(None)
                    counts.append("-")
                    continue
                old_s, old_items = timed(fn, text, 1 if label == "quadratic" else args.repeat)
                skip[label] = old_s > args.old_limit_s / 8
                cells.append(old_s)
                counts.append(str(old_items))
            quad, scan = (f"{c:.4f}" if c is not None else "(skipped)" for c in cells)
            ratio = f"{cells[1] / now_s:.0f}x" if cells[1] is not None and now_s > 0 else ""
            print(f"{name:<16} {len(text) // 1024:>5} {quad:>12} {scan:>14} {now_s:>8.4f} {ratio:>9}  {'/'.join(counts)}/{now_items}")
            sys.stdout.flush()


def cli(argv: list[str] | None = None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    main()

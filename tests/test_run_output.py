"""`datacreator run --out`: each example is written as it lands, so a run that ends early keeps its rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import orjson

from tests.helpers import MCQ, MCQ_INSTRUCTION
from tests.test_cli_errors import SERVICES, datacreator


def test_a_run_cut_short_by_its_timeout_keeps_every_example_it_was_given(tmp_path):
    request = tmp_path / "big.json"
    # Far more than the simulator can answer before the timeout: the run ends on its timeout, not on completion.
    request.write_bytes(orjson.dumps({"request_id": "cut-short", "instruction": MCQ_INSTRUCTION, "formatting_example": MCQ,
                                      "target_count": 200_000}))
    out = tmp_path / "rows.jsonl"
    done = datacreator("run", str(request), "--llm", "simulator", "--out", str(out), "--timeout", "25", "--quiet", timeout=180)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "not final after 25" in done.stderr and "examples created so far are in" in done.stderr
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert rows, "the rows created before the timeout were lost"
    assert len({orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in rows}) == len(rows)  # each example once
    assert all(set(r) == set(MCQ) for r in rows)


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.add(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_stops_the_run_cleanly_keeping_its_rows_and_leaving_no_process(tmp_path):
    request = tmp_path / "big.json"
    request.write_bytes(orjson.dumps({"request_id": "terminated", "instruction": MCQ_INSTRUCTION, "formatting_example": MCQ,
                                      "target_count": 200_000}))
    out = tmp_path / "rows.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "datacreator.cli", "run", str(request), "--llm", "simulator", "--out", str(out), "--quiet"],
                            env={**os.environ, "PYTHONPATH": SERVICES}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out.exists() and out.stat().st_size > 0):
            time.sleep(0.2)
        assert out.exists() and out.stat().st_size > 0, "no row was written while the run went on"
        children = _children(proc.pid)
        assert children  # the embedded broker at least
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert rows and all(set(r) == set(MCQ) for r in rows)  # the file was closed on whole lines
    assert not [pid for pid in children if _alive(pid)], "the run left processes behind"


def test_one_call_in_flight_per_embedded_server_unless_told_otherwise():
    import argparse

    from datacreator.cli import _concurrency

    assert _concurrency(argparse.Namespace(llm="embedded", concurrency=None)) == {"max_concurrency": 1}
    assert _concurrency(argparse.Namespace(llm="embedded", concurrency=None), servers=2) == {"max_concurrency": 2}
    assert _concurrency(argparse.Namespace(llm="embedded", concurrency=4), servers=2) == {"max_concurrency": 4}
    assert _concurrency(argparse.Namespace(llm="simulator", concurrency=None)) == {"max_concurrency": 8}
    assert _concurrency(argparse.Namespace(llm="embedded"), servers=2) == {"max_concurrency": 2}  # `up`
    assert _concurrency(argparse.Namespace(llm="https://api.example.com/v1")) == {}  # `up`: the endpoint's default

"""ChildProcess: process group, log file, SIGTERM then SIGKILL, atexit hook, log tail."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from datacreator.procs import ChildProcess, temp_log_path

# Writes a line, starts a grandchild in the same group, prints its pid, then waits.
SCRIPT = """
import signal, subprocess, sys, time
if sys.argv[1] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("started", grandchild.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie no longer runs; our own children are reaped by Popen, a grandchild by init.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


async def _grandchild_pid(child: ChildProcess) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in child.log_tail().splitlines():
            if line.startswith("started "):
                return int(line.split()[1])
        await asyncio.sleep(0.05)
    raise AssertionError(f"no grandchild: {child.log_tail()!r}")


async def _until_gone(pid: int, timeout_s: float = 5) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return not _alive(pid)


async def test_stop_terminates_the_whole_group_and_keeps_the_log(tmp_path):
    child = ChildProcess()
    log = str(tmp_path / "child.log")
    child.spawn([sys.executable, "-c", SCRIPT, "plain"], log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    pid = child.pid
    assert child.running and pid is not None and os.getpgid(pid) == pid  # a group of its own
    grandchild = await _grandchild_pid(child)
    assert os.getpgid(grandchild) == pid

    started = time.monotonic()
    await child.stop(timeout_s=10)
    assert time.monotonic() - started < 5  # SIGTERM was enough
    assert not child.running and child.pid is None and child.returncode is None
    assert not _alive(pid) and await _until_gone(grandchild)
    assert f"started {grandchild}" in child.log_tail()
    assert child.log_tail(limit=5) == child.log_tail()[-5:]


async def test_stop_escalates_to_sigkill_after_the_timeout(tmp_path):
    child = ChildProcess()
    child.spawn([sys.executable, "-c", SCRIPT, "ignore-term"], temp_log_path("datacreator-test-procs-"))
    try:
        grandchild = await _grandchild_pid(child)
        started = time.monotonic()
        await child.stop(timeout_s=0.5)
        took = time.monotonic() - started
        assert 0.5 <= took < 4
        assert await _until_gone(grandchild)
    finally:
        await child.stop()
        os.unlink(child.log_path or "")


async def test_exit_code_and_log_of_a_failed_command(tmp_path):
    child = ChildProcess()
    child.spawn([sys.executable, "-c", "import sys; print('bad flag'); sys.exit(3)"], str(tmp_path / "c.log"))
    deadline = time.monotonic() + 10
    while child.returncode is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert child.returncode == 3 and not child.running
    assert "bad flag" in child.log_tail()
    await child.stop()


async def test_an_exiting_parent_takes_the_whole_group_with_it(tmp_path):
    # The parent exits without stop(): the atexit hook kills the group. PR_SET_PDEATHSIG alone
    # would reach the child only, so the grandchild being gone shows the hook ran.
    parent = f"""
import asyncio, sys, time
from datacreator.procs import ChildProcess
child = ChildProcess()
child.spawn([sys.executable, "-c", {SCRIPT!r}, "plain"], {str(tmp_path / "c.log")!r})
while "started" not in child.log_tail():
    time.sleep(0.05)
print(child.pid, child.log_tail().split()[1], flush=True)
"""
    done = await asyncio.create_subprocess_exec(sys.executable, "-c", parent, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(done.communicate(), timeout=20)
    assert done.returncode == 0
    child_pid, grandchild = (int(x) for x in out.split())
    assert await _until_gone(child_pid) and await _until_gone(grandchild)

"""Child processes that leave nothing behind: the embedded broker and the embedded LLM server.

    child = ChildProcess()
    child.spawn(argv, log_path, env=env)     # own process group, output appended to log_path
    ...
    await child.stop(timeout_s=10)           # SIGTERM to the group, SIGKILL after timeout_s

`ChildServer` is the base of a server class built on one: `pid`, `running`, `stop()` and
`async with` come from it, `start()` from the subclass.

A child dies with this process however it ends: `stop()` on the normal path, an atexit hook on
interpreter exit, and PR_SET_PDEATHSIG when this process is killed outright.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    # Runs in the child between fork and exec: if the parent is killed outright, the kernel
    # sends SIGTERM to the child, so nothing is left behind. The signal follows the parent
    # *thread*: start children from the event loop's thread, not from a short-lived worker.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:  # not Linux: atexit and the process group still apply
        pass


def temp_log_path(prefix: str) -> str:
    """A new empty log file in the temp folder, named `{prefix}XXXX.log`."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".log")
    os.close(fd)
    return path


class ChildProcess:
    """One command at a time in its own process group (session), its output kept in a log file."""

    def __init__(self) -> None:
        self.log_path: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._atexit_registered = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has ended; None while it runs or before it started."""
        return self._proc.poll() if self._proc else None

    def spawn(
        self,
        argv: Sequence[str],
        log_path: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        """Start `argv` with stdin from /dev/null and stdout and stderr appended to `log_path`."""
        if self.running:
            raise RuntimeError(f"pid {self.pid} is still running")
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self._proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        if not self._atexit_registered:
            atexit.register(self.kill_now)
            self._atexit_registered = True

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the child's process group (nothing if it is gone)."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM to the group, SIGKILL after `timeout_s`; returns once the child has exited."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        # SIGKILL the group even after a clean exit, in case the child left children of its own.
        self.signal_group(signal.SIGKILL)
        while proc.poll() is None:
            await asyncio.sleep(0.01)
        self._proc = None
        if self._atexit_registered:
            atexit.unregister(self.kill_now)
            self._atexit_registered = False

    def kill_now(self) -> None:
        """Blocking stop for atexit: SIGTERM, then SIGKILL, waiting up to 3 s after each."""
        proc = self._proc
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            self.signal_group(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=3)
        self._proc = None

    def log_tail(self, limit: int = 2000) -> str:
        """The last `limit` characters of the log ("" if there is none): for error messages."""
        try:
            return Path(self.log_path or "").read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"ChildProcess(pid={self.pid}, log_path={self.log_path!r})"


class ChildServer:
    """Base of a local server run as a `ChildProcess`; subclasses define `start()`."""

    def __init__(self, log_path: str | None = None) -> None:
        self.log_path = log_path
        self._child = ChildProcess()

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def running(self) -> bool:
        return self._child.running

    async def start(self) -> Self:
        """Spawn the server and return once it answers (subclasses add a `timeout_s`)."""
        raise NotImplementedError

    async def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM to the server's process group, SIGKILL after `timeout_s`."""
        await self._child.stop(timeout_s)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

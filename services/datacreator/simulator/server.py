"""Run the simulator on a local port in a background thread (for tests and benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from .app import Simulator, create_app
from .config import SimulatorConfig
from .stats import SimulatorStats


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say so,
    # and with Nagle on every answer waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listening at once: whoever reads the address we print may connect before the server runs;
    # the backlog holds those connections instead of refusing them.
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: Any, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        backlog=2048,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=2,
    )


class SimulatorServer:
    """The simulator served by uvicorn on `host`, in a daemon thread with its own event loop.

    Usable from sync and async code alike: the caller's loop is never touched.

        with SimulatorServer(SimulatorConfig(rpm=60)) as sim:
            httpx.post(f"{sim.base_url}/chat/completions", json=...)
            sim.stats.max_admitted_in_window()
    """

    def __init__(self, config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        self.app = create_app(config or SimulatorConfig())
        self._engine: Simulator = self.app.state.engine
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def config(self) -> SimulatorConfig:
        return self._engine.config

    @property
    def url(self) -> str:
        """Root URL, e.g. http://127.0.0.1:PORT (where /healthz and /sim/* live)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"{self.url}/v1"

    @property
    def stats(self) -> SimulatorStats:
        return self._engine.stats

    def reset(self, limits: bool = True) -> None:
        """Zero the counters (and, with `limits`, empty the rate-limit window)."""
        self._engine.reset(limits=limits)

    def configure(self, **changes: Any) -> SimulatorConfig:
        """Change settings while running, e.g. `configure(error_rate=0.2, rpm=None)`."""
        return self._engine.configure(**changes)

    def start(self, timeout_s: float = 10.0) -> SimulatorServer:
        if self._thread is not None:
            return self
        self._socket = bind_socket(self.host, self.port)
        self.port = self._socket.getsockname()[1]
        self._engine.closing = False
        self._server = uvicorn.Server(uvicorn_config(self.app, self.host, self.port))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name=f"simulator-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the simulator did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread is None:
            return
        self._engine.closing = True  # wakes requests held by latency or timeout faults
        assert self._server is not None
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._socket is not None:
            self._socket.close()
        self._thread = self._server = self._socket = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimulatorServer(url={self.url!r}, running={self._thread is not None})"

"""Assembling services into a process: one service (`serve planner`) or several in one process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from datacreator.bus.admin import ensure_topics
from datacreator.bus.runtime import Handler, ServiceRunner, install_signal_handlers
from datacreator.config import Settings
from datacreator.health import HealthServer

log = logging.getLogger(__name__)

SERVICE_NAMES = ("planner", "generator", "curator", "sink")
CORE_SERVICES = ("planner", "generator", "curator")


def build_handler(name: str, settings: Settings) -> Handler:
    if name == "planner":
        from datacreator.handlers.planner import PlannerHandler

        return PlannerHandler(settings)
    if name == "generator":
        from datacreator.handlers.generator import GeneratorHandler

        return GeneratorHandler(settings)
    if name == "curator":
        from datacreator.handlers.curator import CuratorHandler

        return CuratorHandler(settings)
    if name == "sink":
        from datacreator.handlers.sink import SinkHandler

        return SinkHandler(settings)
    raise ValueError(f"unknown service {name!r}; choose from {', '.join(SERVICE_NAMES)}")


class ServiceGroup:
    """Runs services on the current event loop until stopped; serves their probes and metrics."""

    def __init__(
        self,
        settings: Settings,
        names: tuple[str, ...] | list[str] = CORE_SERVICES,
        handler_factory: Callable[[str, Settings], Handler] = build_handler,
    ) -> None:
        self.settings = settings
        self.runners = [ServiceRunner(settings, handler_factory(name, settings)) for name in names]
        self.health = HealthServer(settings.runtime.http_host, settings.runtime.http_port, ready=self.ready)
        self._task: asyncio.Task[None] | None = None

    def ready(self) -> bool:
        return all(r.state.ready for r in self.runners)

    def request_stop(self) -> None:
        for runner in self.runners:
            runner.request_stop()

    async def run(self) -> None:
        await ensure_topics(self.settings)
        await self.health.start()
        try:
            await asyncio.gather(*(runner.run() for runner in self.runners))
        finally:
            await self.health.stop()

    async def start(self) -> ServiceGroup:
        """Start in the background; wait until every consumer has its partitions."""
        self._task = asyncio.create_task(self.run(), name="services")
        deadline = asyncio.get_running_loop().time() + 60
        while not self.ready():
            if self._task.done():
                self._task.result()
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("services did not become ready within 60 s")
            await asyncio.sleep(0.05)
        return self

    async def stop(self) -> None:
        self.request_stop()
        if self._task is not None:
            await self._task


async def serve(settings: Settings, names: list[str]) -> None:
    """The foreground entry point of `datacreator serve`: runs until SIGTERM or Ctrl-C."""
    group = ServiceGroup(settings, names)
    install_signal_handlers(group.request_stop)
    await group.run()

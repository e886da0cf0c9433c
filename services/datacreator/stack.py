"""The embedded stack: a Kafka-protocol broker, an LLM endpoint and every service, on one machine.

`datacreator run` and `datacreator up` use it, and so do the end-to-end tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from datacreator.config import Settings
from datacreator.embedded.broker import EmbeddedBroker
from datacreator.serve import CORE_SERVICES, ServiceGroup

log = logging.getLogger(__name__)


@dataclass
class LLMTarget:
    """Where the `default` endpoint points, and what started it (stopped with the stack)."""

    base_url: str
    model: str
    process: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Further servers of the same model (the embedded LLM's other processes).
    base_urls: list[str] = field(default_factory=list)
    more_processes: list[Any] = field(default_factory=list)


async def start_llm(
    llm: str, model: str | None = None, servers: int | None = None, threads: int | None = None, **simulator_config: Any
) -> LLMTarget:
    """`embedded` (llama.cpp with a model shipped in a PyPI package: `servers` processes of
    `threads` threads), `simulator`, or a base URL."""
    if llm == "simulator":
        from datacreator.simulator import SimulatorConfig, SimulatorServer

        server = SimulatorServer(SimulatorConfig(**simulator_config)).start()
        return LLMTarget(server.base_url, "datacreator-simulator", server)
    if llm == "embedded":
        from datacreator.llm.embedded import DEFAULT_MODEL, EmbeddedLLM, default_layout

        count, threads = default_layout(servers, threads)
        # Each server draws its calls' seeds from its own start seed: servers started alike would
        # answer the same prompt with the same examples.
        started = [EmbeddedLLM(model or DEFAULT_MODEL, n_threads=threads, server_args=("--seed", str(i)) if i else ())
                   for i in range(count)]
        outcomes = await asyncio.gather(*(server.start() for server in started), return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            await asyncio.gather(*(server.stop() for server in started), return_exceptions=True)
            raise failed[0]
        first, *rest = started
        # Its GGUF file holds the tokenizer: reservations count the prompt as the server will.
        return LLMTarget(first.base_url, first.model_alias, first, extra={"tokenizer": f"embedded:{first.model_alias}"},
                         base_urls=[s.base_url for s in rest], more_processes=rest)
    if llm.startswith(("http://", "https://")):
        return LLMTarget(llm.rstrip("/"), model or "default")
    raise ValueError(f"--llm takes embedded, simulator or an http(s) base URL, not {llm!r}")


async def stop_llm(target: LLMTarget) -> None:
    for process in [target.process, *target.more_processes]:
        if process is None:
            continue
        result = process.stop()
        if hasattr(result, "__await__"):
            await result


def endpoint_json(target: LLMTarget, **options: Any) -> str:
    config = {"base_url": target.base_url, "model": target.model, **target.extra, **options}
    if target.base_urls:
        config["base_urls"] = target.base_urls
    return json.dumps({"default": config})


class EmbeddedStack:
    def __init__(
        self,
        settings: Settings | None = None,
        services: tuple[str, ...] = CORE_SERVICES,
        broker_port: int = 0,
    ) -> None:
        self.base_settings = settings or Settings()
        self.services = services
        self.broker = EmbeddedBroker(port=broker_port)
        self.settings: Settings | None = None
        self.group: ServiceGroup | None = None

    async def start(self, **overrides: Any) -> Settings:
        await self.broker.start()
        self.settings = self.base_settings.with_updates(
            kafka_bootstrap=self.broker.bootstrap, kafka_client_overrides=self.broker.client_overrides(), **overrides
        )
        self.group = ServiceGroup(self.settings, self.services)
        await self.group.start()
        return self.settings

    async def stop(self) -> None:
        if self.group is not None:
            with contextlib.suppress(Exception):
                await self.group.stop()
        await self.broker.stop()

    async def __aenter__(self) -> EmbeddedStack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

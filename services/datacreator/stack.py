"""The embedded stack: a Kafka-protocol broker, an LLM endpoint and every service, on one machine.

`datacreator run` and `datacreator up` use it, and so do the end-to-end tests and benchmarks.
"""

from __future__ import annotations

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


async def start_llm(llm: str, model: str | None = None, **simulator_config: Any) -> LLMTarget:
    """`embedded` (llama.cpp with a model shipped in a PyPI package), `simulator`, or a base URL."""
    if llm == "simulator":
        from datacreator.simulator import SimulatorConfig, SimulatorServer

        server = SimulatorServer(SimulatorConfig(**simulator_config)).start()
        return LLMTarget(server.base_url, "datacreator-simulator", server)
    if llm == "embedded":
        from datacreator.llm.embedded import DEFAULT_MODEL, EmbeddedLLM

        server = EmbeddedLLM(model or DEFAULT_MODEL)
        await server.start()
        # Its GGUF file holds the tokenizer: reservations count the prompt as the server will.
        return LLMTarget(server.base_url, server.model_alias, server, extra={"tokenizer": f"embedded:{server.model_alias}"})
    if llm.startswith(("http://", "https://")):
        return LLMTarget(llm.rstrip("/"), model or "default")
    raise ValueError(f"--llm takes embedded, simulator or an http(s) base URL, not {llm!r}")


async def stop_llm(target: LLMTarget) -> None:
    process = target.process
    if process is None:
        return
    result = process.stop()
    if hasattr(result, "__await__"):
        await result


def endpoint_json(target: LLMTarget, **options: Any) -> str:
    config = {"base_url": target.base_url, "model": target.model, **target.extra, **options}
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

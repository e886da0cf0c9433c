"""Generator: one LLM call per task, under the endpoint's shared rate limit; the answer becomes a candidate."""

from __future__ import annotations

import logging
from collections import OrderedDict

from datacreator.bus.readback import StatusWatcher
from datacreator.bus.runtime import BaseHandler, Context, Delivery, Output
from datacreator.config import Settings
from datacreator.contracts import Candidate, GenerationTask, Usage
from datacreator.llm.client import LLMPool
from datacreator.llm.verify import verify_answer

log = logging.getLogger(__name__)


class _RecentIds:
    """Task ids answered lately, so a redelivered task does not pay for a second call."""

    def __init__(self, size: int = 100_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._ids

    def add(self, task_id: str) -> None:
        self._ids[task_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)


class GeneratorHandler(BaseHandler):
    name = "generator"
    ordered = False

    def __init__(self, settings: Settings, pool: LLMPool | None = None) -> None:
        self.settings = settings
        self.inputs = {settings.topics.tasks: GenerationTask}
        self.pool = pool
        self.status = StatusWatcher(settings).release_after(settings.final_state_ttl_s)
        self._answered = _RecentIds()
        self._calling: set[str] = set()

    async def start(self, ctx: Context) -> None:
        await super().start(ctx)
        if self.pool is None:
            self.pool = LLMPool(self.settings, redis_url=self.settings.redis_url, replicas_hint=self.settings.generator_replicas,
                                window_s=self.settings.ratelimit_window_s)
        await self.status.start()

    async def stop(self) -> None:
        await self.status.stop()
        if self.pool is not None:
            await self.pool.aclose()

    async def handle(self, task: GenerationTask, delivery: Delivery) -> list[Output]:
        if self.status.is_closed(task.request_id) or task.task_id in self._answered or task.task_id in self._calling:
            return []  # a task the planner resent after a restart: one call answers both
        assert self.pool is not None
        self._calling.add(task.task_id)
        try:
            return await self._call(task, delivery)
        finally:
            self._calling.discard(task.task_id)

    async def _call(self, task: GenerationTask, delivery: Delivery) -> list[Output]:
        assert self.pool is not None
        try:
            client = self.pool.get(task.model.endpoint)
        except KeyError as exc:
            candidate = Candidate(task=task, endpoint=task.model.endpoint, model=task.model.name or "unknown",
                                  error=f"unknown endpoint: {exc.args[0] if exc.args else task.model.endpoint}", attempts=0)
        else:
            result = await client.complete(task)
            candidate = Candidate(
                task=task,
                endpoint=task.model.endpoint,
                model=result.model,
                raw_output=result.text,
                error=result.error,
                usage=result.usage if isinstance(result.usage, Usage) else Usage.model_validate(result.usage),
                cost_usd=result.cost_usd,
                latency_s=result.latency_s,
                attempts=result.attempts,
                throttled=result.throttled,
            )
            candidate.verification = await verify_answer(self.pool, task, candidate.raw_output)  # label checks (llm/verify.py)
        self._answered.add(task.task_id)
        outputs = [Output(self.settings.topics.candidates, task.request_id, candidate)]
        if candidate.error is not None:
            # The planner learns of the failure through the candidate; the DLQ keeps the task for audit.
            outputs.append(self.ctx.dead_letter(delivery, candidate.error, attempts=candidate.attempts,
                                                error_type="LLMCallFailed"))
        return outputs

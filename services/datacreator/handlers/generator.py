"""Generator: one LLM call per task, under the endpoint's shared rate limit; the answer becomes a candidate."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from datacreator.bus.readback import StatusWatcher
from datacreator.bus.runtime import BaseHandler, Context, Delivery, Output
from datacreator.config import Settings
from datacreator.contracts import Candidate, GenerationTask, Usage
from datacreator.llm.client import LLMPool
from datacreator.llm.verify import verify_answer

log = logging.getLogger(__name__)


class _RecentIds:
    """Tasks answered lately, so a redelivered task does not pay for a second call.

    A task is known by its id and its created_at: the planner issues a task again under the same
    id when its outcome did not come in time (a new created_at), and that issue is called again."""

    def __init__(self, size: int = 100_000) -> None:
        self._ids: OrderedDict[tuple[str, float], None] = OrderedDict()
        self._size = size

    def __contains__(self, task: tuple[str, float]) -> bool:
        return task in self._ids

    def add(self, task: tuple[str, float]) -> None:
        self._ids[task] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)


class GeneratorHandler(BaseHandler):
    name = "generator"
    ordered = False

    def __init__(self, settings: Settings, pool: LLMPool | None = None) -> None:
        self.settings = settings
        self.inputs = {settings.topics.tasks: GenerationTask}
        self.pool = pool
        self.status = StatusWatcher(settings).release_after(settings.runtime.final_state_ttl_s)
        self._answered = _RecentIds()
        self._calling: dict[str, asyncio.Future[list[Output]]] = {}  # task id -> its call under way

    async def start(self, ctx: Context) -> None:
        await super().start(ctx)
        if self.pool is None:
            limits = self.settings.generator
            self.pool = LLMPool(self.settings, redis_url=limits.redis_url, replicas_hint=limits.replicas, window_s=limits.ratelimit_window_s)
            self.pool.build_all()
        await self.status.start()

    async def stop(self) -> None:
        await self.status.stop()
        if self.pool is not None:
            await self.pool.aclose()

    async def handle(self, task: GenerationTask, delivery: Delivery) -> list[Output]:
        while True:
            if self.status.is_closed(task.request_id) or (task.task_id, task.created_at) in self._answered:
                return []  # a task the planner resent after a restart: one call answers both
            running = self._calling.get(task.task_id)
            if running is None:
                break
            # The same task is being called (a redelivery after a rebalance gave the partition back
            # to this member, or an issue again of a slow task): wait for that call rather than be
            # committed without it, and answer with its candidate (the curator drops the repeat).
            # If that call is cancelled (its record revoked, or a shutdown), this one makes it.
            await asyncio.wait({running})
            if not running.cancelled():
                return running.result()
        assert self.pool is not None
        call = self._calling[task.task_id] = asyncio.get_running_loop().create_future()
        try:
            outputs = await self._call(task, delivery)
        except BaseException:
            call.cancel()
            raise
        else:
            call.set_result(outputs)
            return outputs
        finally:
            if self._calling.get(task.task_id) is call:
                del self._calling[task.task_id]

    def on_dead_letter(self, message: Any, delivery: Delivery, reason: Exception) -> list[Output]:
        """A task whose call raised (every attempt) is still answered, by a candidate carrying the
        error: the curator turns it into the task's outcome and the planner counts a failed call."""
        task = message
        candidate = Candidate(task=task, endpoint=task.model.endpoint, model=task.model.name or "unknown",
                              error=f"the generator could not make the call: {type(reason).__name__}: {str(reason)[:500]}",
                              attempts=0)
        return [Output(self.settings.topics.candidates, task.request_id, candidate)]

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
        self._answered.add((task.task_id, task.created_at))
        outputs = [Output(self.settings.topics.candidates, task.request_id, candidate)]
        if candidate.error is not None:
            # The planner learns of the failure through the candidate; the DLQ keeps the task for audit.
            outputs.append(self.ctx.dead_letter(delivery, candidate.error, attempts=candidate.attempts,
                                                error_type="LLMCallFailed"))
        return outputs

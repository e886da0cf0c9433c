"""The simulator's HTTP app: an OpenAI-compatible chat completions endpoint, plus `/sim/*` controls."""

from __future__ import annotations

import asyncio
import hmac
import random
import time
import uuid
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .config import MODEL_NAME, SimulatorConfig
from .generate import Faults, estimate_tokens, malform, prompt_chars, write_examples
from .latency import sample_latency
from .limits import Decision, SlidingWindowLimiter, retry_after_header
from .stats import SimulatorStats
from .verify import Verifier


class Simulator:
    """The run-time state behind the app: settings, counters, limiter and random source."""

    def __init__(self, config: SimulatorConfig):
        self.config = config
        self.stats = SimulatorStats()
        self.limiter = SlidingWindowLimiter(config.rate_window_s)
        self.rng = random.Random(config.seed)
        self.calls = 0  # answers written so far; with the seed it makes every answer's text distinct
        self.closing = False
        self.started = int(time.time())
        self.verifier = Verifier()

    def configure(self, **changes: Any) -> SimulatorConfig:
        """Apply a patch of settings (validated as a whole); the rate window keeps its admissions."""
        config = self.config.patched(changes)
        if config.seed != self.config.seed:
            self.rng.seed(config.seed)
        self.limiter.window_s = config.rate_window_s
        self.config = config
        return config

    def reset(self, limits: bool = True) -> None:
        """Zero the counters; with `limits`, also empty the rate-limit window."""
        self.stats.reset()
        if limits:
            self.limiter.clear()

    def write(self, body: dict[str, Any], config: SimulatorConfig) -> str:
        self.calls += 1
        rng = random.Random(config.seed * 1_000_003 + self.calls)
        faults = Faults(config.wrong_structure_rate, config.label_out_of_space_rate, config.copy_rate)
        if (labels := self.verifier.answer(rng, body, config.verify_agreement)) is not None:  # label checks: verify.py
            return labels
        answer = write_examples(rng, body["messages"], body.get("response_format"), faults)
        self.verifier.remember(answer)
        for kind, times in faults.injected.items():
            self.stats.fault(kind, times)
        return answer

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake when the server stops so that held requests do not delay shutdown."""
        if seconds <= 0:
            return
        end = time.monotonic() + seconds
        while not self.closing:
            left = end - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.25))


def _json(stats: SimulatorStats | None, status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    if stats is not None:
        stats.answered(status)
    return Response(orjson.dumps(payload), status_code=status, headers=headers, media_type="application/json")


def _error(stats: SimulatorStats | None, status: int, message: str, kind: str, code: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return _json(stats, status, {"error": {"message": message, "type": kind, "param": None, "code": code}}, headers)


def _authorized(request: Request, key: str) -> bool:
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())


def _unauthorized(stats: SimulatorStats | None) -> Response:
    # the key, given or expected, never appears in the answer
    return _error(stats, 401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")


def _limit_message(decision: Decision, cost: int) -> str:
    if decision.too_large:
        return f"Request too large for the simulator's tokens per window: limit {decision.tpm}, requested {cost}."
    wait = retry_after_header(decision.retry_after_s)
    if decision.limited_by == "requests":
        return f"Rate limit reached for requests: limit {decision.rpm}. Please try again in {wait}s."
    return f"Rate limit reached for tokens: limit {decision.tpm}, requested {cost}. Please try again in {wait}s."


async def chat_completions(request: Request) -> Response:
    sim: Simulator = request.app.state.engine
    config = sim.config  # one consistent view for the whole request
    stats = sim.stats
    stats.received()
    if config.api_key and not _authorized(request, config.api_key):
        return _unauthorized(stats)
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return _error(stats, 400, "The body is not valid JSON.", "invalid_request_error")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return _error(stats, 400, "'messages' must be a non-empty list.", "invalid_request_error", "invalid_messages")
    if body.get("stream"):
        return _error(stats, 400, "The simulator does not stream.", "invalid_request_error", "stream_unsupported")

    rng = sim.rng
    if config.storm_429_rate and rng.random() < config.storm_429_rate:
        stats.fault("storm_429")
        return _error(
            stats, 429, "Rate limit reached (simulator 429 storm). Please try again later.", "requests", "rate_limit_exceeded",
            {"retry-after": str(config.storm_retry_after_s)},
        )

    prompt_tokens = estimate_tokens(prompt_chars(body["messages"]))
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    answer: str | None = None
    if config.tpm_counts_max_tokens and isinstance(max_tokens, int) and max_tokens > 0:
        cost = prompt_tokens + max_tokens
    else:
        answer = sim.write(body, config)
        cost = prompt_tokens + estimate_tokens(len(answer))
    now = time.monotonic()
    decision = sim.limiter.try_admit(now, cost, config.rpm, config.tpm)
    headers = decision.headers()
    if not decision.admitted:
        return _error(stats, 429, _limit_message(decision, cost), decision.limited_by or "requests", "rate_limit_exceeded", headers)
    stats.admitted(now, cost)

    if config.error_rate and rng.random() < config.error_rate:
        status = rng.choice((500, 503))
        stats.fault(f"error_{status}")
        await sim.sleep(sample_latency(config, rng))
        if status == 500:
            return _error(stats, 500, "The simulator failed this request on purpose (injected fault).", "server_error")
        return _error(stats, 503, "The simulator is overloaded on purpose (injected fault).", "server_error", None, {"retry-after": "1"})
    if config.timeout_rate and rng.random() < config.timeout_rate:
        stats.fault("timeout")
        stats.held()
        await sim.sleep(config.timeout_hold_s)

    if answer is None:
        answer = sim.write(body, config)
    completion_tokens = estimate_tokens(len(answer))
    if config.malformed_rate and rng.random() < config.malformed_rate:
        answer, kind = malform(rng, answer, config.malformed_truncated_share)
        stats.fault(kind)
    await sim.sleep(sample_latency(config, rng, completion_tokens))
    stats.usage(prompt_tokens, completion_tokens)
    return _json(
        stats,
        200,
        {
            "id": f"chatcmpl-sim-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL_NAME,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        },
        headers,
    )


async def models(request: Request) -> Response:
    sim: Simulator = request.app.state.engine
    if sim.config.api_key and not _authorized(request, sim.config.api_key):
        return _unauthorized(None)  # the counters are about chat completions only
    return _json(None, 200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": sim.started, "owned_by": "datacreator"}]})


async def healthz(request: Request) -> Response:
    return _json(None, 200, {"status": "ok", "simulator": MODEL_NAME})


async def sim_stats(request: Request) -> Response:
    return _json(None, 200, request.app.state.engine.stats.snapshot())


async def sim_reset(request: Request) -> Response:
    keep_limits = request.query_params.get("limits", "true").lower() in ("false", "0", "no")
    request.app.state.engine.reset(limits=not keep_limits)
    return _json(None, 200, {"reset": True})


async def sim_config(request: Request) -> Response:
    sim: Simulator = request.app.state.engine
    if request.method == "GET":
        return _json(None, 200, sim.config.public_dump())
    try:
        patch = orjson.loads(await request.body() or b"{}")
    except orjson.JSONDecodeError:
        return _error(None, 400, "The body is not valid JSON.", "invalid_request_error")
    if not isinstance(patch, dict):
        return _error(None, 400, "The body must be a JSON object of settings.", "invalid_request_error")
    try:
        config = sim.configure(**patch)
    except ValidationError as exc:
        # without the input values: a misplaced key must not come back in the answer
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False))
        return _error(None, 400, f"Invalid settings: {problems}", "invalid_request_error")
    return _json(None, 200, config.public_dump())


def create_app(config: SimulatorConfig | None = None) -> Starlette:
    """The simulator as an ASGI app; `app.state.simulator` is its `SimulatorStats`."""
    engine = Simulator(config or SimulatorConfig())
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/sim/stats", sim_stats, methods=["GET"]),
            Route("/sim/reset", sim_reset, methods=["POST"]),
            Route("/sim/config", sim_config, methods=["GET", "POST"]),
        ]
    )
    app.state.engine = engine
    app.state.simulator = engine.stats
    return app

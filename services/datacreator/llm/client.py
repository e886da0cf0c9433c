"""An OpenAI-compatible chat client that paces, retries and accounts for every call.

One `LLMClient` per endpoint alias holds one pooled HTTP client. A call goes:
circuit breaker -> concurrency slot -> rate limiter -> POST /chat/completions -> headers to the
limiter -> parse, settle the limiter, cost and metrics. Provider faults never raise: they end up
in `CallResult.outcome` and `CallResult.error`, which never hold the API key.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Self

import httpx
import orjson

from datacreator import metrics
from datacreator.config import EndpointConfig, Settings
from datacreator.contracts import GenerationTask, Usage
from datacreator.llm import tokenizer as tokenizers
from datacreator.logic.cost import call_cost_usd
from datacreator.logic.prompt import (
    build_messages,
    estimate_call_tokens,
    estimate_prompt_tokens,
    estimate_text_tokens,
    response_format,
)
from datacreator.logic.retry import CircuitBreaker, RetryPolicy
from datacreator.ratelimit import (
    REQUESTS,
    TOKENS,
    Hooks,
    RateLimiter,
    Reservation,
    backoff_after_429,
    build_rate_limiter,
    parse_retry_after,
)

log = logging.getLogger("datacreator.llm")

# The response format of a call, given the endpoint's structured-output mode.
FormatFn = Callable[[GenerationTask, str], dict[str, Any] | None]
_RETRYABLE = {"429", "5xx", "timeout", "connection", "malformed"}
_BREAKER_FAILURES = {"5xx", "timeout", "connection", "malformed"}
_DOWNGRADE = {"json_schema": "json_object", "json_object": "none"}
_ERROR_SNIPPET = 300
# A server of a several-server endpoint that refused a connection is tried after the others for this long.
UNREACHABLE_PAUSE_S = 10.0
# Connections per httpx client. httpcore 1.0's pool walks every connection it holds, and for each
# idle one every connection again, on each request and each response (encode/httpcore#1035): one
# pool of 32 connections cost 3.4-4.7 ms of CPU per call, four pools of 8 cost 1.15-1.35 ms
# (32 calls in flight against the simulator, same run). A server's calls are spread over pools of
# at most this many connections.
POOL_CONNECTIONS = 8
_KEYLIKE = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+|\b(sk|pk|key|api[-_]?key)[-_][A-Za-z0-9_\-*.]{6,}")


@dataclass
class CallResult:
    text: str | None
    usage: Usage
    latency_s: float
    attempts: int
    outcome: str  # ok|429|5xx|timeout|connection|malformed|circuit_open|client_error
    error: str | None
    cost_usd: float
    model: str
    throttled: int = 0  # attempts the provider answered with 429

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass
class _Attempt:
    outcome: str
    text: str | None = None
    usage: Usage | None = None
    error: str | None = None
    retry_after: float | None = None
    format_rejected: bool = False
    usage_reported: bool = False


def circuit_gauge(alias: str) -> Callable[[bool], None]:
    """The circuit breaker's watcher that keeps the endpoint's `circuit_open` gauge."""
    return lambda is_open: metrics.circuit_open.labels(alias).set(1 if is_open else 0)


class LLMClient:
    """Calls one endpoint. Safe to share between any number of concurrent tasks."""

    def __init__(
        self,
        alias: str,
        cfg: EndpointConfig,
        limiter: RateLimiter,
        policy: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        *,
        tpm_counts: Literal["max_tokens", "usage"] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.alias = alias
        self.cfg = cfg
        self.limiter = limiter
        self.policy = policy or RetryPolicy(max_attempts=cfg.max_attempts)
        self.breaker = breaker or CircuitBreaker(alias=alias)
        if self.breaker.on_state is None:
            self.breaker.on_state = circuit_gauge(alias)
            self.breaker.on_state(False)
        # Providers that charge prompt + max_tokens at admission keep that charge: settling down to
        # the real usage would let more through than they allow.
        self.tpm_counts = tpm_counts or getattr(cfg, "tpm_counts", None) or "max_tokens"
        self.mode: str = cfg.structured_output
        key = cfg.key()
        self._secret = key.get_secret_value() if key else None
        headers = {"content-type": "application/json", "accept": "application/json"}
        if self._secret:
            headers["authorization"] = f"Bearer {self._secret}"
        # Per server of the endpoint, pools of at most POOL_CONNECTIONS connections; a call takes
        # the least busy server, then its least busy pool.
        pools = max(1, -(-cfg.max_concurrency // POOL_CONNECTIONS))
        per_pool = -(-cfg.max_concurrency // pools)
        self._servers = [
            [
                httpx.AsyncClient(
                    base_url=url.rstrip("/") + "/",
                    headers=headers,
                    http2=cfg.http2,
                    timeout=httpx.Timeout(
                        connect=cfg.connect_timeout_s, read=cfg.read_timeout_s, write=cfg.read_timeout_s, pool=cfg.total_timeout_s
                    ),
                    limits=httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool),
                    transport=transport,
                )
                for _ in range(pools)
            ]
            for url in cfg.servers
        ]
        self._busy = [[0] * pools for _ in self._servers]
        self._unreachable_until = [0.0] * len(self._servers)
        self._next = 0
        self._slots = asyncio.Semaphore(cfg.max_concurrency)
        self._tokenizer: tokenizers.Tokenizer | None = None
        self._tokenizer_loaded = not cfg.tokenizer
        self._tokenizer_lock = asyncio.Lock()

    # -- public ------------------------------------------------------------------------------

    async def complete(
        self, task: GenerationTask, messages: list[dict[str, str]] | None = None, fmt: FormatFn | None = None
    ) -> CallResult:
        """One call for `task`; `messages` and `fmt` replace the generation prompt and its format (label checks)."""
        started = time.monotonic()
        model = task.model.name or self.cfg.model
        messages = messages if messages is not None else build_messages(task)
        estimate = await self.estimate(messages, task.model.max_tokens)
        attempts = 0
        billed = 0  # prompt tokens of failed attempts a provider may bill (timed out, malformed answer)
        last = _Attempt("connection", error="no attempt made")
        throttled = 0
        try:
            async with asyncio.timeout(self.cfg.total_timeout_s) as deadline:
                while True:
                    if not self.breaker.allow():
                        metrics.llm_calls.labels(self.alias, "circuit_open").inc()
                        wait = self.breaker.retry_in()
                        last = _Attempt("circuit_open", error=f"circuit open for endpoint {self.alias}; next probe in {wait:.1f}s")
                        break
                    attempts += 1
                    last = await self._attempt(task, model, messages, estimate, fmt, deadline)
                    throttled += last.outcome == "429"
                    if last.outcome == "ok":
                        if billed and last.usage is not None:
                            last.usage = Usage(prompt_tokens=last.usage.prompt_tokens + billed, completion_tokens=last.usage.completion_tokens)
                        return self._success(last, model, started, attempts, throttled)
                    if last.outcome in ("timeout", "malformed"):
                        billed += estimate - task.model.max_tokens  # the prompt
                    if last.format_rejected:
                        attempts -= 1  # a setting to change, not a fault of the endpoint
                        continue
                    if last.outcome not in _RETRYABLE or attempts >= self.policy.max_attempts:
                        break
                    delay = self.policy.delay(attempts, last.retry_after)
                    level = logging.DEBUG if last.outcome == "429" else logging.WARNING
                    log.log(
                        level, "LLM call to %s failed (%s), attempt %d of %d; retrying in %.2fs",
                        self.alias, last.error, attempts, self.policy.max_attempts, delay,
                    )
                    await asyncio.sleep(delay)
        except TimeoutError:
            last = _Attempt("timeout", error=f"no answer within the {self.cfg.total_timeout_s:g}s deadline ({last.error})")
        metrics.llm_tasks_failed.labels(self.alias).inc()
        error = self._redact(f"{last.error} after {attempts} attempt(s)")
        log.warning("LLM call to %s gave up: %s", self.alias, error)
        usage = Usage(prompt_tokens=billed)
        return CallResult(
            text=None, usage=usage, latency_s=time.monotonic() - started, attempts=attempts, outcome=last.outcome,
            error=error, cost_usd=call_cost_usd(usage, self.cfg.input_price_per_1m, self.cfg.output_price_per_1m), model=model,
            throttled=throttled,
        )

    async def estimate(self, messages: list[dict[str, str]], max_tokens: int) -> int:
        """Tokens to reserve for a call: the prompt by the endpoint's tokenizer when it has one
        (counted in a worker thread), else by the per-script estimate; plus `max_tokens`."""
        if not self._tokenizer_loaded:
            async with self._tokenizer_lock:
                if not self._tokenizer_loaded:
                    self._tokenizer = await asyncio.to_thread(tokenizers.load, self.cfg.tokenizer or "")
                    self._tokenizer_loaded = True
        if self._tokenizer is None:
            return estimate_call_tokens(messages, max_tokens)
        return await asyncio.to_thread(estimate_call_tokens, messages, max_tokens, self._tokenizer.count)

    async def _post(self, body: bytes) -> httpx.Response:
        # Servers that could not be reached lately last, then fewest calls in flight; among equals,
        # in turn, so that idle servers share the work.
        count = len(self._servers)
        now = time.monotonic()
        chosen = min(range(count), key=lambda i: (self._unreachable_until[i] > now, sum(self._busy[i]), (i - self._next) % count))
        self._next = (chosen + 1) % count
        busy = self._busy[chosen]
        pool = busy.index(min(busy))
        busy[pool] += 1
        try:
            return await self._servers[chosen][pool].post("chat/completions", content=body)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            if count > 1:
                self._unreachable_until[chosen] = time.monotonic() + UNREACHABLE_PAUSE_S
            raise
        finally:
            busy[pool] -= 1

    @property
    def is_closed(self) -> bool:
        return all(pool.is_closed for server in self._servers for pool in server)

    async def aclose(self) -> None:
        for server in self._servers:
            for pool in server:
                await pool.aclose()
        await self.limiter.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- one attempt ---------------------------------------------------------------------------

    def _body(self, task: GenerationTask, model: str, messages: list[dict[str, str]], fmt_of: FormatFn | None = None) -> bytes:
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "temperature": task.model.temperature,
            "max_tokens": task.model.max_tokens,
        }
        if task.model.top_p is not None:
            body["top_p"] = task.model.top_p
        fmt = (fmt_of or response_format)(task, self.mode)  # type: ignore[arg-type]
        if fmt is not None:
            body["response_format"] = fmt
        return orjson.dumps(body)

    async def _attempt(
        self, task: GenerationTask, model: str, messages: list[dict[str, str]], estimate: int, fmt: FormatFn | None = None,
        deadline: asyncio.Timeout | None = None,
    ) -> _Attempt:
        body = self._body(task, model, messages, fmt)
        recorded = False
        # The deadline is the endpoint's: waiting here for a free slot or for the rate limit is not
        # its time, so the deadline is paused meanwhile. Without the pause, calls queued behind a
        # one-at-a-time server (the embedded one) ran out of time before they were sent.
        loop = asyncio.get_running_loop()
        when = deadline.when() if deadline is not None else None
        remaining = when - loop.time() if when is not None else None
        if deadline is not None and remaining is not None:
            deadline.reschedule(None)
        try:
            async with self._slots:
                reservation = await self.limiter.acquire(estimate)
                if deadline is not None and remaining is not None:
                    deadline.reschedule(loop.time() + remaining)
                metrics.ratelimit_wait_seconds.labels(self.alias).observe(reservation.waited_s)
                metrics.llm_in_flight.labels(self.alias).inc()
                sent = time.monotonic()
                try:
                    response = await self._post(body)
                except httpx.TimeoutException as exc:
                    result = _Attempt("timeout", error=f"timed out ({type(exc).__name__})")
                except httpx.TransportError as exc:
                    result = _Attempt("connection", error=f"connection failed ({type(exc).__name__}: {exc})")
                else:
                    result = await self._read(response, messages, task.model.max_tokens, reservation, time.monotonic() - sent)
                finally:
                    metrics.llm_in_flight.labels(self.alias).dec()
            if result.outcome in ("timeout", "connection") and self.tpm_counts == "usage":
                await self.limiter.settle(reservation, 0)
            metrics.llm_calls.labels(self.alias, result.outcome).inc()
            if result.outcome == "ok":
                self.breaker.record_success()
            elif result.outcome in _BREAKER_FAILURES:
                self.breaker.record_failure()
            else:
                self.breaker.record_neutral()
            recorded = True
            return result
        finally:
            if not recorded:  # cancelled (deadline): free the probe slot if this was the probe
                self.breaker.record_neutral()

    async def _read(
        self, response: httpx.Response, messages: list[dict[str, str]], max_tokens: int, reservation: Reservation, latency: float
    ) -> _Attempt:
        self.limiter.observe_headers(response.headers, reservation)
        status = response.status_code
        if status == 200:
            result = self._parse(response, messages, max_tokens)
            if result.outcome == "ok":
                assert result.usage is not None
                if result.usage_reported:
                    # What the provider charged: the real usage, or the prompt plus max_tokens.
                    charged = result.usage.total_tokens if self.tpm_counts == "usage" else result.usage.prompt_tokens + max_tokens
                    if charged != reservation.tokens:
                        await self.limiter.settle(reservation, charged)
                metrics.llm_latency_seconds.labels(self.alias).observe(latency)
            return result
        if status == 429:
            # Refused before admission: the provider counts none of its tokens.
            await self.limiter.settle(reservation, 0)
            retry_after = backoff_after_429(response.headers)
            if retry_after:
                # Every coroutine and replica on this endpoint pauses, not just this call.
                await self.limiter.hold(retry_after)
            return _Attempt("429", error=f"HTTP 429: {self._snippet(response)}", retry_after=retry_after)
        if status >= 500:
            if self.tpm_counts == "usage":
                await self.limiter.settle(reservation, 0)
            retry_after = parse_retry_after(response.headers) if status == 503 else None
            return _Attempt("5xx", error=f"HTTP {status}: {self._snippet(response)}", retry_after=retry_after)
        await self.limiter.settle(reservation, 0)
        text = self._snippet(response)
        if status == 400 and self.mode in _DOWNGRADE and re.search(r"response_format|json_schema|structured", text, re.I):
            old, self.mode = self.mode, _DOWNGRADE[self.mode]
            log.warning("endpoint %s refused response_format %s; using %s from now on", self.alias, old, self.mode)
            return _Attempt("client_error", error=f"HTTP 400: {text}", format_rejected=True)
        if status == 408:
            return _Attempt("timeout", error=f"HTTP 408: {text}")
        return _Attempt("client_error", error=f"HTTP {status}: {text}")

    def _parse(self, response: httpx.Response, messages: list[dict[str, str]], max_tokens: int) -> _Attempt:
        try:
            data = orjson.loads(response.content)
            content = data["choices"][0]["message"]["content"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            return _Attempt("malformed", error=f"malformed response ({type(exc).__name__}): {self._snippet(response)}")
        if not isinstance(content, str):
            return _Attempt("malformed", error="response without message content")
        raw_usage = data.get("usage") if isinstance(data, dict) else None
        try:
            usage = Usage(prompt_tokens=int(raw_usage["prompt_tokens"]), completion_tokens=int(raw_usage["completion_tokens"]))
        except (TypeError, KeyError, ValueError):
            usage = Usage(prompt_tokens=estimate_prompt_tokens(messages), completion_tokens=estimate_text_tokens(content))
            return _Attempt("ok", text=content, usage=usage)
        return _Attempt("ok", text=content, usage=usage, usage_reported=True)

    def _success(self, attempt: _Attempt, model: str, started: float, attempts: int, throttled: int = 0) -> CallResult:
        usage = attempt.usage or Usage()
        cost = call_cost_usd(usage, self.cfg.input_price_per_1m, self.cfg.output_price_per_1m)
        metrics.llm_tokens.labels(self.alias, "prompt").inc(usage.prompt_tokens)
        metrics.llm_tokens.labels(self.alias, "completion").inc(usage.completion_tokens)
        if cost:
            metrics.llm_cost_usd.labels(self.alias).inc(cost)
        for kind, ratio in self.limiter.usage_ratio().items():
            metrics.ratelimit_usage_ratio.labels(self.alias, kind).set(ratio)
        return CallResult(
            text=attempt.text, usage=usage, latency_s=time.monotonic() - started, attempts=attempts,
            outcome="ok", error=None, cost_usd=cost, model=model, throttled=throttled,
        )

    # -- secrets stay out ------------------------------------------------------------------------

    def _snippet(self, response: httpx.Response) -> str:
        try:
            text = response.text
        except Exception:  # undecodable body
            text = repr(response.content[:_ERROR_SNIPPET])
        text = " ".join(text.split())
        if len(text) > _ERROR_SNIPPET:
            text = text[:_ERROR_SNIPPET] + "..."
        return self._redact(text)

    def _redact(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
            # Providers echo a key shortened with stars (sk-abc***wxyz): hide what is left of it too.
            if len(self._secret) >= 8:
                text = text.replace(self._secret[:6], "***").replace(self._secret[-4:], "***")
        return _KEYLIKE.sub(lambda m: (m.group(1) or "") + "***", text)


def _publish_usage(alias: str, ratios: dict[str, float]) -> None:
    for kind, ratio in ratios.items():
        metrics.ratelimit_usage_ratio.labels(alias, kind).set(ratio)


def _publish_fallback(alias: str, active: bool) -> None:
    metrics.ratelimit_fallback.labels(alias).set(1 if active else 0)


# The rate limiters report through these; they never import metrics themselves.
METRICS_HOOKS = Hooks(usage=_publish_usage, fallback=_publish_fallback)


class LLMPool:
    """One `LLMClient` per endpoint alias of `Settings.endpoints`, built by `build_all` or on first use."""

    def __init__(
        self,
        settings: Settings,
        redis_url: str | None = None,
        *,
        replicas_hint: int = 1,
        window_s: float = 60.0,
    ) -> None:
        self.settings = settings
        self.redis_url = redis_url if redis_url is not None else settings.generator.redis_url
        self.replicas_hint = replicas_hint
        self.window_s = window_s
        self._clients: dict[str, LLMClient] = {}

    @property
    def aliases(self) -> list[str]:
        return sorted(self.settings.endpoints)

    def build_all(self) -> None:
        """Build every endpoint's client now, before the first call: building one (its SSL
        context, its connection pools) holds the event loop tens of ms, and built on first use it
        held every other task of a request's first round."""
        for alias in self.aliases:
            try:
                self.get(alias)
            except Exception as exc:  # built again, and failing as a call, on first use
                log.warning("LLM endpoint %s: client not built at start (%s: %s)", alias, type(exc).__name__, exc)

    def get(self, alias: str) -> LLMClient:
        client = self._clients.get(alias)
        if client is not None:
            return client
        endpoints = self.settings.endpoints
        if alias not in endpoints:
            known = ", ".join(sorted(endpoints)) or "none"
            raise KeyError(f"unknown LLM endpoint alias {alias!r} (configured: {known})")
        cfg = endpoints[alias]
        if cfg.rpm:
            metrics.ratelimit_limit.labels(alias, REQUESTS).set(cfg.rpm)
        if cfg.tpm:
            metrics.ratelimit_limit.labels(alias, TOKENS).set(cfg.tpm)
        limiter = build_rate_limiter(alias, cfg, self.redis_url, self.replicas_hint, window_s=self.window_s, hooks=METRICS_HOOKS)
        client = LLMClient(alias, cfg, limiter, RetryPolicy(max_attempts=cfg.max_attempts), CircuitBreaker(alias=alias))
        self._clients[alias] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

"""The endpoint's own tokenizer for TPM reservations: SmolLM2's GGUF vocabulary, no server."""

from __future__ import annotations

import json
import uuid

import httpx

from datacreator.config import EndpointConfig
from datacreator.contracts import ModelSpec
from datacreator.llm import tokenizer as tokenizers
from datacreator.llm.client import LLMClient
from datacreator.llm.embedded import MODELS, locate
from datacreator.logic.prompt import build_messages, estimate_call_tokens, estimate_prompt_tokens
from datacreator.logic.retry import RetryPolicy
from datacreator.ratelimit import LocalRateLimiter, Reservation
from datacreator.stack import LLMTarget, endpoint_json
from tests.helpers import make_task
from tests.test_embedded_llm import _smollm2_or_skip

MIXED = "Write a question about photosynthesis. 这是一个中文句子，用于测试。 Привет, мир! " * 20


class Recording(LocalRateLimiter):
    def __init__(self) -> None:
        super().__init__(rpm=None, tpm=10_000_000, window_s=60.0)
        self.reserved: list[int] = []

    async def acquire(self, tokens: int) -> Reservation:
        self.reserved.append(tokens)
        return await super().acquire(tokens)


def answer(request: httpx.Request) -> httpx.Response:
    body = {"choices": [{"message": {"content": "[]"}}], "usage": {"prompt_tokens": 11, "completion_tokens": 1}}
    return httpx.Response(200, json=body)


def client(tokenizer: str | None, limiter: Recording) -> LLMClient:
    cfg = EndpointConfig(base_url="http://llm.test/v1", model="m", structured_output="none", tokenizer=tokenizer)
    return LLMClient(f"tok-{uuid.uuid4().hex[:6]}", cfg, limiter, RetryPolicy(max_attempts=1), transport=httpx.MockTransport(answer))


def test_the_gguf_vocabulary_counts_without_the_weights():
    _smollm2_or_skip()
    path = locate(MODELS["smollm2-135m"])
    vocab = tokenizers.GGUFTokenizer(path)
    assert vocab.count("") == 0
    assert 1 <= vocab.count("Hello") <= 2
    # Chinese and Cyrillic take far more tokens than characters / 4, and more than the per-script estimate.
    tokens = vocab.count(MIXED)
    assert tokens > len(MIXED) / 4 * 1.5
    assert tokenizers.load(f"gguf:{path}") is tokenizers.load(f"gguf:{path}")  # loaded once per process
    assert tokenizers.resolve("embedded:smollm2-135m") == path


async def test_the_reservation_counts_the_prompt_with_the_endpoint_tokenizer():
    _smollm2_or_skip()
    task = make_task("t1", request_id="tok", instruction=MIXED, model=ModelSpec(max_tokens=64))
    messages = build_messages(task)
    vocab = tokenizers.load("embedded:smollm2-135m")
    assert vocab is not None
    limiter = Recording()
    llm = client("embedded:smollm2-135m", limiter)
    try:
        result = await llm.complete(task)
    finally:
        await llm.aclose()
    assert result.ok
    counted = estimate_call_tokens(messages, 64, vocab.count)
    assert limiter.reserved == [counted]
    assert counted > estimate_call_tokens(messages, 64)  # the per-script estimate reserved less
    assert estimate_prompt_tokens(messages, vocab.count) == counted - 64


async def test_an_unavailable_tokenizer_falls_back_to_the_estimate():
    task = make_task("t2", request_id="tok", instruction=MIXED, model=ModelSpec(max_tokens=64))
    limiter = Recording()
    llm = client("gguf:/nonexistent/model.gguf", limiter)
    try:
        assert (await llm.complete(task)).ok
    finally:
        await llm.aclose()
    assert limiter.reserved == [estimate_call_tokens(build_messages(task), 64)]


def test_the_embedded_endpoint_names_its_tokenizer():
    target = LLMTarget("http://127.0.0.1:1/v1", "smollm2-135m", extra={"tokenizer": "embedded:smollm2-135m"})
    assert json.loads(endpoint_json(target, max_concurrency=1))["default"]["tokenizer"] == "embedded:smollm2-135m"

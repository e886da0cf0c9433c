"""The token estimate a call reserves before it is sent, for text in different scripts."""

from __future__ import annotations

from datacreator.logic.prompt import estimate_text_tokens
from datacreator.ratelimit import LocalRateLimiter


def test_latin_text_keeps_four_characters_a_token():
    assert estimate_text_tokens("a" * 400) == 100
    assert estimate_text_tokens("café " * 80) == 100  # accents are still Latin


def test_cjk_counts_about_one_token_a_character():
    chinese = "机器学习模型需要大量的训练数据。" * 10  # 160 characters
    japanese = "データセットを作成します。" * 10
    korean = "데이터를 만듭니다" * 10
    assert estimate_text_tokens(chinese) >= 150  # chars / 4 said 40
    assert estimate_text_tokens(japanese) >= 0.9 * len(japanese)
    assert estimate_text_tokens(korean) >= 0.8 * len(korean)


def test_cyrillic_and_mixed_text_are_not_undercounted():
    russian = "Создайте вопросы с вариантами ответа. " * 10
    assert estimate_text_tokens(russian) >= len(russian) / 2.5
    mixed = "Translate 数据 into English: " * 10
    assert estimate_text_tokens(mixed) > estimate_text_tokens("Translate xx into English: " * 10)


async def test_the_limiter_reserves_the_cjk_estimate():
    limiter = LocalRateLimiter(rpm=None, tpm=500, window_s=5.0)
    first = await limiter.acquire(estimate_text_tokens("数据" * 200))  # 400 characters, ~400 tokens
    assert first.tokens >= 380
    assert limiter.usage_ratio()["tokens"] >= 0.76  # a second such prompt has to wait

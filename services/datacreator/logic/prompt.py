"""The prompt of one generation call, its response format and its token estimate.

The wording is part of the project's contract: the LLM simulator reads the number of examples,
the formatting examples and the planned label of each item back out of it. Small models copy their formatting example, so the
prompt is short, direct and says plainly not to copy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, Literal

from datacreator.contracts import GenerationTask
from datacreator.logic.shape import batch_schema

SYSTEM_PROMPT = "You create training data. Answer with JSON only."

StructuredOutput = Literal["json_schema", "json_object", "none"]

# Chat formats add a few tokens of framing per message, and a few to prime the reply.
_TOKENS_PER_MESSAGE = 4
_TOKENS_PER_REPLY = 3


def _json_block(data: Any) -> str:
    return "```json\n" + json.dumps(data, indent=2, ensure_ascii=False) + "\n```"


def _values(values: list[Any]) -> str:
    return ", ".join(json.dumps(v, ensure_ascii=False) for v in values)


def _label_sentence(task: GenerationTask) -> str | None:
    if not task.label_space:
        return None
    field = task.label_field or "label"
    return f'The "{field}" field must be one of: {_values(task.label_space)}.'


def _label_rules(task: GenerationTask) -> list[str]:
    """What the call asks of the labels: the plan's label per item, else all different (the paper's rule)."""
    field = task.label_field
    if not field:
        return []
    if task.planned_labels:
        n = len(task.planned_labels)
        return [
            # The simulator reads this list back (`simulator.generate.Prompt`): keep its wording.
            f'The "{field}" of the {n} examples, in order: {_values(task.planned_labels)}.',
            f'Each example must clearly belong to the task and truly be an example of its "{field}": '
            f'write its "{field}" first, then content that fits that "{field}" and no other.',
        ]
    rules = []
    if task.label_space and task.num_examples > len(task.label_space):
        rules.append(f'Use every "{field}" value, each about equally often.')
    else:
        rules.append(f'The examples must all have different "{field}" values.')
    rules.append(f'Each example must clearly belong to the task and truly deserve its "{field}".')
    return rules


def build_user_prompt(task: GenerationTask) -> str:
    n = task.num_examples
    several = len(task.references) > 1
    parts = [task.instruction.strip()]
    parts.append("Here are examples of the format:" if several else "Here is an example of the format:")
    parts.extend(_json_block(ref.data) for ref in task.references)
    request = [
        f"Write exactly {n} new examples of the same JSON structure, "
        "each different from the examples above and from each other.",
        "Do not copy the examples; write new content." if several else "Do not copy the example; write new content.",
        # Small models otherwise open their answer with the formatting example and stay on its topic.
        "They are already in the data set, so start with a new one." if several
        else "It is already in the data set, so start with a new one.",
        "Give each example a different topic.",
    ]
    label = _label_sentence(task)
    if label:
        request.append(label)
    request.extend(_label_rules(task))
    request.append(f'Return one JSON object: {{"examples": [...]}} with exactly {n} items.')
    parts.append(" ".join(request))
    return "\n\n".join(parts)


def build_messages(task: GenerationTask) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": build_user_prompt(task)},
    ]


def response_format(task: GenerationTask, mode: StructuredOutput) -> dict[str, Any] | None:
    """The `response_format` field of the request body for the endpoint's structured-output mode."""
    if mode == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": "examples", "strict": True, "schema": batch_schema(
                task.example_schema, task.num_examples, task.label_field, task.planned_labels)},
        }
    if mode == "json_object":
        return {"type": "json_object"}
    if mode == "none":
        return None
    raise ValueError(f"unknown structured output mode: {mode!r}")


# Characters per token by script, as BPE tokenizers of common models split them: Latin text about
# 4, Cyrillic, Greek, Arabic and Hebrew about 2, CJK, kana and Hangul about 1, and scripts or symbols
# tokenizers rarely merge (Indic, Thai, emoji) at least 1. Erring high is safe: a call settles with
# the provider's usage, and an estimate that is too low lets a window take more than the limit.
_ONE_PER_CHAR = re.compile(r"[\u0900-\u0dff\u0e00-\u0eff\u1100-\u11ff\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00010000-\U0010ffff]")
_TWO_PER_TOKEN = re.compile(r"[\u0370-\u03ff\u0400-\u052f\u0590-\u06ff\u0750-\u077f]")


def estimate_text_tokens(text: str) -> int:
    """Tokens in `text`, estimated per script (no tokenizer needed)."""
    if text.isascii():
        return math.ceil(len(text) / 4)
    dense = len(_ONE_PER_CHAR.findall(text))
    medium = len(_TWO_PER_TOKEN.findall(text))
    rest = len(text) - dense - medium
    return math.ceil(dense + medium / 2 + rest / 4)


def estimate_prompt_tokens(messages: list[dict[str, Any]], count: Callable[[str], int] = estimate_text_tokens) -> int:
    """Tokens of a prompt: each message's content by `count` (the endpoint's tokenizer, else the
    per-script estimate, see `estimate_text_tokens`), plus each message's framing."""
    total = _TOKENS_PER_REPLY
    for message in messages:
        content = message.get("content") or ""
        if not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False)
        total += count(content) + _TOKENS_PER_MESSAGE
    return total


def estimate_call_tokens(messages: list[dict[str, Any]], max_tokens: int, count: Callable[[str], int] = estimate_text_tokens) -> int:
    """Tokens a call may use at most: what a provider counts against tokens per minute when it admits it."""
    return estimate_prompt_tokens(messages, count) + max_tokens

"""parse_examples on ugly model answers: every good item kept, every bad fragment reported."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from datacreator.logic import parsing
from datacreator.logic.parsing import parse_examples

CORPUS = Path(__file__).parent / "data" / "ugly_outputs"
KEYS = ["question", "options", "answer"]

GOOD = [
    {"question": "Which planet is closest to the sun?", "options": {"A": "Venus", "B": "Mercury", "C": "Mars", "D": "Earth"}, "answer": "B"},
    {"question": "What do {curly} and [square] brackets look like in \"quotes\"?", "options": {"A": "{", "B": "]", "C": "\"", "D": "\\"}, "answer": "A"},
    {"question": "How many sides does a hexagon have?", "options": {"A": "5", "B": "6", "C": "7", "D": "8"}, "answer": "B"},
]


def dumps(value: object, indent: bool = False) -> str:
    return json.dumps(value, indent=2 if indent else None, ensure_ascii=False)


def test_bare_list_is_fast_path() -> None:
    result = parse_examples(dumps(GOOD))
    assert result.items == GOOD
    assert result.errors == []


@pytest.mark.parametrize("wrapper", ["examples", "data", "whatever_name"])
def test_object_holding_the_list(wrapper: str) -> None:
    result = parse_examples(dumps({wrapper: GOOD}))
    assert result.items == GOOD
    assert result.errors == []


def test_single_object_is_one_item() -> None:
    result = parse_examples(dumps(GOOD[0]), KEYS)
    assert result.items == [GOOD[0]]


def test_lone_example_whose_only_key_holds_objects_stays_whole_with_key_hint() -> None:
    dialog = {"turns": [{"speaker": "a", "text": "hi"}, {"speaker": "b", "text": "hello"}]}
    assert parse_examples(dumps(dialog), ["turns"]).items == [dialog]
    # Without the hint the single list value is taken as the list of examples.
    assert parse_examples(dumps(dialog)).items == dialog["turns"]


@pytest.mark.parametrize("fence", ["```json", "```JSON", "```", "``` json"])
def test_fenced_with_prose_around(fence: str) -> None:
    raw = f"Sure, here you go:\n\n{fence}\n{dumps(GOOD, indent=True)}\n```\n\nHope this helps."
    result = parse_examples(raw)
    assert result.items == GOOD
    assert result.errors == []


def test_prose_without_fences() -> None:
    raw = f"Here are the examples: {dumps({'examples': GOOD})} -- all of them follow the format."
    assert parse_examples(raw).items == GOOD


def test_bracketed_prose_before_the_list_is_ignored() -> None:
    raw = f"Here are [3] examples (see [note 1]):\n{dumps(GOOD)}\nDone."
    result = parse_examples(raw)
    assert result.items == GOOD


def test_several_fenced_blocks_are_concatenated() -> None:
    raw = f"First:\n```json\n{dumps(GOOD[:2])}\n```\nand one more:\n```json\n{dumps(GOOD[2])}\n```"
    result = parse_examples(raw, KEYS)
    assert result.items == GOOD


def test_trailing_commas() -> None:
    text = dumps(GOOD, indent=True)
    raw = text.replace('"\n  }', '",\n  }').replace("}\n]", "},\n]")
    assert raw != text
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    assert parse_examples(raw).items == GOOD


def test_trailing_comma_inside_a_string_is_kept() -> None:
    item = {"question": "Is ',]' odd?", "options": {"A": "x,}", "B": "y"}, "answer": "A"}
    raw = dumps([item])[:-1] + ",]"
    assert parse_examples(raw).items == [item]


def test_one_bad_element_among_good_ones() -> None:
    bad = '{"question": "broken" "options": {}, "answer": "A"}'
    raw = "[" + ", ".join([dumps(GOOD[0]), bad, dumps(GOOD[1]), dumps(GOOD[2])]) + "]"
    result = parse_examples(raw)
    assert result.items == GOOD
    assert len(result.errors) == 1
    assert result.errors[0].fragment == bad


def test_non_object_junk_between_items_is_reported() -> None:
    raw = "[" + dumps(GOOD[0]) + ", oops, " + dumps(GOOD[1]) + "]"
    result = parse_examples(raw)
    assert result.items == GOOD[:2]
    assert [e.fragment for e in result.errors] == ["oops"]


@pytest.mark.parametrize("cut", [0.2, 0.5, 0.9])
def test_truncated_list_keeps_complete_items(cut: float) -> None:
    text = dumps(GOOD)
    third = text.index(dumps(GOOD[2]))
    cut_at = third + max(1, int(len(dumps(GOOD[2])) * cut))
    result = parse_examples(text[:cut_at])
    assert result.items == GOOD[:2]
    assert len(result.errors) == 1
    assert result.errors[0].reason == "truncated item"
    assert text[third:cut_at].startswith(result.errors[0].fragment[:10])


def test_truncated_inside_wrapper_and_unclosed_fence() -> None:
    text = dumps({"examples": GOOD}, indent=True)
    cut = text.index('"How many sides')
    result = parse_examples("```json\n" + text[:cut])
    assert result.items == GOOD[:2]
    assert [e.reason for e in result.errors] == ["truncated item"]


def test_json_lines() -> None:
    raw = "\n".join(dumps(item) for item in GOOD)
    assert parse_examples(raw, KEYS).items == GOOD


def test_scalars_in_list_are_items_for_the_validator_to_reject() -> None:
    result = parse_examples(dumps([GOOD[0], 42, "text"]))
    assert result.items == [GOOD[0], 42, "text"]


@pytest.mark.parametrize("raw", ["", "   ", None])
def test_empty_output_is_an_error(raw: str | None) -> None:
    result = parse_examples(raw)
    assert result.items == []
    assert len(result.errors) == 1


def test_long_fragments_are_clipped() -> None:
    raw = "[" + dumps(GOOD[0]) + ', {"question": "' + "x" * 10_000
    result = parse_examples(raw)
    assert result.items == [GOOD[0]]
    assert len(result.errors[0].fragment) <= 2000


def test_corpus_of_ugly_outputs() -> None:
    expected = json.loads((CORPUS / "expected.json").read_text())
    files = sorted(CORPUS.glob("*.txt"))
    assert {f.name for f in files} == set(expected)
    for path in files:
        result = parse_examples(path.read_text(), KEYS)
        want = expected[path.name]
        assert (len(result.items), len(result.errors)) == (want["items"], want["errors"]), path.name
        for item in result.items:
            assert set(item) == set(KEYS), path.name
            assert item["answer"] in item["options"], path.name


# -- wrappers, nesting, repeated keys, bounds, linear salvage ---------------------------------

KEYS3 = ("question", "options", "answer")
ITEM = {"question": "q", "options": {"A": "a", "B": "b"}, "answer": "A"}


def test_the_wrapper_list_that_matches_the_schema_wins() -> None:
    # Before: the first wrapper key's list was taken, empty or not: 0 items and no rejection.
    raw = orjson.dumps({"items": [], "examples": [ITEM, ITEM | {"question": "r"}]}).decode()
    assert parse_examples(raw, KEYS3).items == [ITEM, ITEM | {"question": "r"}]
    raw = orjson.dumps({"data": [1, 2], "examples": [ITEM]}).decode()
    assert parse_examples(raw, KEYS3).items == [ITEM]


def test_one_level_of_nesting_is_unwrapped() -> None:
    raw = orjson.dumps([[ITEM, ITEM | {"question": "r"}]]).decode()
    result = parse_examples(raw, KEYS3)
    assert result.items == [ITEM, ITEM | {"question": "r"}] and not result.errors


def test_repeated_keys_are_rejected_not_overwritten() -> None:
    # Before: orjson kept the last "answer" silently.
    raw = '[{"question": "q", "options": {"A": "a", "B": "b"}, "answer": "A", "answer": "B"}, ' + orjson.dumps(ITEM).decode() + "]"
    result = parse_examples(raw, KEYS3)
    assert result.items == [ITEM]
    assert [(e.code, e.item["answer"]) for e in result.errors] == [("duplicate_key", "B")]
    nested = '{"examples": [{"question": "q", "options": {"A": "a", "A": "b"}, "answer": "A"}]}'
    assert [e.code for e in parse_examples(nested, KEYS3).errors] == ["duplicate_key"]
    # A key-like text inside a string is not a key.
    tricky = [ITEM | {"question": 'say "answer": twice'}]
    assert parse_examples(orjson.dumps(tricky).decode(), KEYS3).items == tricky


def test_repeated_keys_in_salvaged_items_are_rejected() -> None:
    raw = 'Here: [{"question": "q", "question": "p", "options": {"A": "a"}, "answer": "A"}, {"question": "cut'
    result = parse_examples(raw, KEYS3)
    assert "duplicate_key" in [e.code for e in result.errors] and result.items == []


def test_deep_and_large_items_are_kept_out() -> None:
    raw = "[" + orjson.dumps(ITEM).decode() + ', {"question": "q", "options": ' + "[" * 300 + '"x"' + "]" * 300 + ', "answer": "A"}]'
    result = parse_examples(raw, KEYS3)
    assert result.items == [ITEM]
    assert [e.code for e in result.errors] == ["structure_mismatch"] and "deeper than 32" in result.errors[0].reason
    big = orjson.dumps([ITEM | {"question": "w" * 100_000}]).decode()
    result = parse_examples(big, KEYS3)
    assert result.items == [] and "limit is" in result.errors[0].reason


def test_salvage_looks_back_a_bounded_distance() -> None:
    """Salvage is linear: the key before each list is found from the last string, not by a search
    from the segment's start (which made a 130 KB degenerate answer take seconds)."""
    import re

    calls = {"n": 0, "chars": 0}
    real = parsing._COLON_GAP

    class Counting:
        def fullmatch(self, text, start, end):
            calls["n"] += 1
            calls["chars"] += end - start
            return real.fullmatch(text, start, end)

    unit = '"question": "Which?", "options": ["apple", "brick"], "answer": "A", '
    raw = "{" + unit * 2000 + '"question": "Wh'
    parsing._COLON_GAP = Counting()
    try:
        parse_examples(raw, KEYS3)
    finally:
        parsing._COLON_GAP = real
    assert calls["n"] == 2000 and calls["chars"] <= 2000 * 4  # a colon and a space between key and list
    assert not hasattr(parsing, "_KEY_BEFORE") and isinstance(real, re.Pattern)


def test_a_cut_at_any_point_keeps_every_item_before_it() -> None:
    items = [ITEM | {"question": f'q{i} {{"a": [1]}} \\"x\\"'} for i in range(4)]
    text = orjson.dumps({"examples": items}).decode()
    starts = [text.index(orjson.dumps(item).decode()) for item in items]
    ends = [start + len(orjson.dumps(item)) for start, item in zip(starts, items, strict=True)]
    for cut in range(starts[0], len(text) - 2):
        result = parse_examples(text[:cut], KEYS3)
        assert result.items == [item for item, end in zip(items, ends, strict=True) if end <= cut], cut
        assert [e.reason for e in result.errors] in ([], ["truncated item"]), cut


def test_garbage_made_of_brackets_is_read_a_bounded_amount() -> None:
    result = parse_examples("{}" * 300_000, KEYS3)
    assert len(result.items) == parsing.MAX_FRAGMENTS
    assert "not read" in result.errors[-1].reason
    # Deeper than salvage follows: one cut-off value, no item, nothing raised.
    result = parse_examples("[{" * 500_000, KEYS3)
    assert result.items == [] and [e.reason for e in result.errors] == ["truncated item"]
    # Lists in the top object are looked at one by one (is it the item list?); lists among the
    # items are skipped in one regex match.
    result = parse_examples("{" + "[1], " * 300_000, KEYS3)
    assert result.items == [] and "not read" in result.errors[-1].reason
    result = parse_examples('{"examples": [' + "[]" * 300_000, KEYS3)
    assert result.items == [] and [e.reason for e in result.errors] == ["item is not a JSON object"]


def test_repeated_keys_are_found_whatever_the_strings_hold() -> None:
    # Keys are counted with str.count: quotes and colons inside strings must not hide a repeat.
    for raw in ('[{"a": "x\\":", "a": 1}]', '[{"a": "\\u0022:", "a": 1}]', '[{"a\\\\": 1, "a\\\\": 2}]',
                '[{"a" : 1, "a": 2}]', '[{"a":\n1, "a"\n: 2}]'):
        assert [e.code for e in parse_examples(raw).errors] == ["duplicate_key"], raw
    for raw in ('[{"a": "x\\":", "b": 1}]', '[{"a\\\\": 1, "b": "\\\\\\":"}]', '[{"a" : 1, "b": 2}]'):
        result = parse_examples(raw)
        assert result.errors == [] and result.items == [json.loads(raw)[0]], raw

"""`datacreator export`: exact rows in every format, a manifest that matches, a stable split."""

from __future__ import annotations

import csv
import hashlib
import json
import random

import orjson
import pandas as pd
import pytest

from datacreator.contracts import CreationRequest, Example, RequestState, RequestStatus, Strategy
from datacreator.export import export_command, split_examples, write_export
from datacreator.logic.dedup import example_id
from tests.test_consumer import publish

pytestmark = pytest.mark.timeout(60)

RID = "req-export"


def mc_example(n: int, request_id: str = RID) -> Example:
    data = {
        "question": f"Which item number {n} fits, {'yes' if n % 3 else 'no'}?",
        "options": {"A": f"first {n}", "B": f"second {n}"},
        "answer": "A" if n % 2 else "B",
    }
    return Example(
        example_id=example_id(request_id, data), request_id=request_id, data=data, strategy=Strategy.random,
        reference_ids=[None], task_id=f"t{n}", chain=0, step=0, model="small-model",
    )


def done(accepted: int) -> RequestStatus:
    return RequestStatus(
        request_id=RID, state=RequestState.COMPLETED, target_count=accepted, accepted=accepted,
        rejected={"duplicate": 3}, llm_calls=7, cost_usd=0.0123, strategy=Strategy.random, model="small-model",
    )


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def by_question(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: r["question"])


@pytest.fixture
def examples() -> list[Example]:
    return [mc_example(n) for n in range(25)]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_formats_hold_exactly_the_distinct_examples(tmp_path, examples, fmt):
    shuffled = examples + examples[:5]  # redeliveries
    random.Random(1).shuffle(shuffled)
    manifest_path = write_export(shuffled, tmp_path / f"data.{fmt}", fmt, request_id=RID, status=done(25))
    manifest = json.loads(manifest_path.read_text())
    [entry] = manifest["files"]
    path = tmp_path / entry["name"]
    assert entry["rows"] == 25 and entry["sha256"] == sha(path)
    expected = by_question([e.data for e in examples])
    if fmt == "jsonl":
        rows = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        assert by_question(rows) == expected
        frame = pd.read_json(path, lines=True)
    elif fmt == "parquet":
        frame = pd.read_parquet(path)
        rows = frame.to_dict("records")
        assert by_question([{**r, "options": dict(r["options"])} for r in rows]) == expected
    else:
        with open(path, newline="") as src:
            rows = list(csv.DictReader(src))
        assert by_question([{**r, "options": json.loads(r["options"])} for r in rows]) == expected
        frame = pd.read_csv(path)
    assert len(frame) == 25 and set(frame.columns) == {"question", "options", "answer"}
    assert manifest["request_id"] == RID and manifest["complete"] is True
    assert manifest["counts"]["exported"] == 25 and manifest["counts"]["rejected"] == {"duplicate": 3}
    assert manifest["cost"]["usd"] == pytest.approx(0.0123)
    assert manifest["model"] == "small-model" and manifest["strategy"] == "random"
    assert manifest["example_schema"]["properties"]["options"]["type"] == "object"


def test_output_paths(tmp_path):
    from datacreator.export import output_paths

    files, manifest = output_paths(str(tmp_path / "new") + "/", "csv", "r1", split=False)
    assert files == {"all": tmp_path / "new" / "r1.csv"} and manifest == tmp_path / "new" / "r1.manifest.json"
    files, manifest = output_paths(tmp_path / "data.jsonl", "jsonl", "r1", split=True)
    assert files == {"train": tmp_path / "data.train.jsonl", "validation": tmp_path / "data.validation.jsonl"}
    assert manifest == tmp_path / "data.manifest.json"


def test_same_examples_give_the_same_bytes(tmp_path, examples):
    a = write_export(examples, tmp_path / "a.jsonl", request_id=RID)
    b = write_export(list(reversed(examples)), tmp_path / "b.jsonl", request_id=RID)
    assert json.loads(a.read_text())["files"][0]["sha256"] == json.loads(b.read_text())["files"][0]["sha256"]


def test_split_is_deterministic_and_independent_of_arrival_order(tmp_path, examples):
    train, validation = split_examples(examples, 0.8, seed=0)
    assert (len(train), len(validation)) == (20, 5)
    assert {e.example_id for e in train}.isdisjoint(e.example_id for e in validation)
    again = split_examples(list(reversed(examples)), 0.8, seed=0)
    assert [e.example_id for e in again[0]] == [e.example_id for e in train]
    other_seed = split_examples(examples, 0.8, seed=1)
    assert {e.example_id for e in other_seed[1]} != {e.example_id for e in validation}
    # More examples later: the earlier validation examples stay on the validation side mostly,
    # and none of the earlier train examples moves unless it is pushed past the cut.
    grown_train, _ = split_examples(examples + [mc_example(n) for n in range(25, 50)], 0.8, seed=0)
    assert len({e.example_id for e in grown_train} & {e.example_id for e in train}) >= 15

    manifest = json.loads(write_export(examples, tmp_path / "d.parquet", "parquet", request_id=RID, split=0.8).read_text())
    sizes = {f["split"]: f["rows"] for f in manifest["files"]}
    assert sizes == {"train": 20, "validation": 5}
    frame = pd.read_parquet(tmp_path / "d.train.parquet")
    assert sorted(frame["question"]) == sorted(e.data["question"] for e in train)
    assert manifest["split"]["seed"] == 0


def test_loads_with_datasets(tmp_path, examples):
    datasets = pytest.importorskip("datasets")
    write_export(examples, tmp_path / "d.jsonl", request_id=RID, split=0.8)
    loaded = datasets.load_dataset(
        "json", data_files={"train": str(tmp_path / "d.train.jsonl"), "validation": str(tmp_path / "d.validation.jsonl")},
        cache_dir=str(tmp_path / "cache"),
    )
    assert (loaded["train"].num_rows, loaded["validation"].num_rows) == (20, 5)
    assert set(loaded["train"].column_names) == {"question", "options", "answer"}


async def test_export_from_the_bus(bus_settings, tmp_path, examples, capsys):
    request = CreationRequest(
        request_id=RID, instruction="Write two-option questions.", formatting_example=examples[0].data, target_count=25,
        label_field="answer", label_space=["A", "B"],
    )
    other = mc_example(1, request_id="someone-else")
    await publish(bus_settings, bus_settings.topics.requests, [(RID, request)])
    await publish(bus_settings, bus_settings.topics.examples, [(RID, e) for e in examples[:20]] + [("x", other)])
    running = done(20).model_copy(update={"state": RequestState.RUNNING})
    await publish(bus_settings, bus_settings.topics.status, [(RID, running)])

    manifest_path = await export_command(bus_settings, RID, "jsonl", tmp_path / "out.jsonl")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["state"] == "RUNNING" and manifest["complete"] is False
    assert "may be incomplete" in capsys.readouterr().err
    assert manifest["instruction"] == request.instruction
    assert manifest["example_schema"]["properties"]["answer"]["enum"] == ["A", "B"]

    await publish(bus_settings, bus_settings.topics.examples, [(RID, e) for e in examples[15:]])
    await publish(bus_settings, bus_settings.topics.status, [(RID, done(25))])
    manifest = json.loads((await export_command(bus_settings, RID, "csv", tmp_path, split=0.8, seed=3)).read_text())
    assert manifest["complete"] is True
    assert {f["name"]: f["rows"] for f in manifest["files"]} == {f"{RID}.train.csv": 20, f"{RID}.validation.csv": 5}
    frames = [pd.read_csv(tmp_path / f["name"]) for f in manifest["files"]]
    assert sorted(pd.concat(frames)["question"]) == sorted(e.data["question"] for e in examples)


@pytest.mark.parametrize("request_id", ["../../escape", "/etc/passwd", "a/b", "..", "x\x00y"])
def test_export_into_a_directory_keeps_the_request_id_inside_it(tmp_path, request_id) -> None:
    # Before: the id was joined into the path unchecked ("../../escape" wrote outside --out).
    from datacreator.export import output_paths
    from datacreator.handlers.sink import request_dir_name

    out = tmp_path / "out"
    out.mkdir()
    files, manifest = output_paths(out, "jsonl", request_id, split=False)
    for path in [*files.values(), manifest]:
        assert path.parent == out and path.name.startswith(request_dir_name(request_id))
    assert output_paths(out, "jsonl", "demo-1", split=False)[0]["all"] == out / "demo-1.jsonl"

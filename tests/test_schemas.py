"""schemas/ is the public contract: it must be exactly what the models say."""

from pathlib import Path

import jsonschema
import yaml

from datacreator import contract_files
from datacreator.contracts import MESSAGE_MODELS, CreationRequest

SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "schemas"


def test_schema_files_match_the_models():
    expected = contract_files.render()
    on_disk = {p.name: p.read_bytes() for p in SCHEMAS_DIR.iterdir() if p.is_file()}
    stale = sorted(name for name in expected if on_disk.get(name) != expected[name])
    extra = sorted(set(on_disk) - set(expected))
    assert not stale and not extra, f"schemas/ drifted from the models (stale {stale}, extra {extra}): run `datacreator schemas`"


def test_every_message_type_has_a_schema_and_a_channel():
    names = {name for names, _ in contract_files.CHANNELS.values() for name in names}
    assert names == set(MESSAGE_MODELS)
    doc = yaml.safe_load(contract_files.render()["asyncapi.yaml"])
    assert doc["asyncapi"].startswith("3.")
    assert {c["address"] for c in doc["channels"].values()} >= {"datacreator.requests", "datacreator.examples"}


def test_published_schema_accepts_a_real_message_and_refuses_a_bad_one():
    schema = contract_files.json_schemas()["creation_request"]
    good = CreationRequest(instruction="x", formatting_example={"q": "a"}, target_count=2).model_dump(mode="json")
    jsonschema.validate(good, schema)
    bad = dict(good, target_count=0)
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("target_count 0 must be invalid")

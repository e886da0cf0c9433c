"""The public contract as files: a JSON Schema per message type and an AsyncAPI 3 document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml

from datacreator import __version__
from datacreator.config import TopicNames
from datacreator.contracts import MESSAGE_MODELS, SCHEMA_VERSION

# topic field of TopicNames -> (message schema names, what the channel carries)
CHANNELS: dict[str, tuple[list[str], str]] = {
    "requests": (["creation_request", "cancel_request"], "Requests to create examples, and cancellations. Key: request_id."),
    "tasks": (["generation_task"], "One LLM call's worth of work, planner to generators. Key: request_id."),
    "candidates": (["candidate"], "Raw model answers, generators to curator. Key: request_id."),
    "examples": (["example"], "The product: accepted, de-duplicated examples. Key: request_id."),
    "rejected": (["rejection"], "Items of candidates that were dropped, with a reason code. Key: request_id."),
    "outcomes": (["task_outcome"], "What each task produced after curation, curator to planner. Key: request_id."),
    "status": (["request_status"], "Latest state and counts of each request (compacted). Key: request_id."),
    "dlq": (["dead_letter"], "Messages that could not be processed, with the error and their origin."),
    "planner_state": (["planner_snapshot"], "The planner's snapshots for resuming after a restart (compacted, internal)."),
}


def json_schemas() -> dict[str, dict[str, Any]]:
    out = {}
    for name, model in MESSAGE_MODELS.items():
        schema = model.model_json_schema(mode="serialization")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"{name}.schema.json"
        out[name] = schema
    return out


def asyncapi_document(topics: TopicNames | None = None) -> dict[str, Any]:
    topics = topics or TopicNames()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for field, (names, description) in CHANNELS.items():
        address = getattr(topics, field)
        channel_messages = {}
        for name in names:
            messages[name] = {
                "name": name,
                "contentType": "application/json",
                "payload": {"$ref": f"./{name}.schema.json"},
                "bindings": {"kafka": {"key": {"type": "string", "description": "request_id"}}},
            }
            channel_messages[name] = {"$ref": f"#/components/messages/{name}"}
        channels[field] = {"address": address, "description": description, "messages": channel_messages}
        operations[f"publish_{field}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{field}"},
            "messages": [{"$ref": f"#/channels/{field}/messages/{name}"} for name in names],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "datacreator",
            "version": __version__,
            "description": f"Topics and messages of the datacreator bus (schema_version {SCHEMA_VERSION}).",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def render() -> dict[str, bytes]:
    """File name -> content, exactly as `datacreator schemas` writes them."""
    files = {
        f"{name}.schema.json": orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        for name, schema in json_schemas().items()
    }
    files["asyncapi.yaml"] = yaml.safe_dump(asyncapi_document(), sort_keys=False).encode()
    return files


def write(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in render().items():
        path = directory / name
        path.write_bytes(content)
        written.append(path)
    return written

"""`datacreator export`: a request's distinct examples as files for training, with a manifest.

Rows are the examples' `data` objects, sorted by example id, so the same examples always give
the same bytes. A train/validation split ranks examples by a seeded hash of their id: it does
not depend on arrival order, and an example keeps its side when more examples are added.
The manifest (`<stem>.manifest.json`) records the request, the model and its sampling settings,
its status counts and cost, the exported rows per label beside the label plan's targets, the
example JSON Schema, and every file with its row count and sha256.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import orjson

from datacreator.bus.codec import PoisonMessage, decode_request
from datacreator.bus.readback import read_to_end
from datacreator.config import Settings
from datacreator.contracts import CreationRequest, Example, RequestState, RequestStatus
from datacreator.handlers.sink import request_dir_name
from datacreator.logic.labels import label_of
from datacreator.logic.shape import example_schema
from datacreator.remote import collect_examples, latest_status

log = logging.getLogger(__name__)

Format = Literal["jsonl", "parquet", "csv"]
FORMATS: tuple[str, ...] = ("jsonl", "parquet", "csv")


# -- pure parts -------------------------------------------------------------------------------


def split_examples(examples: Iterable[Example], train_share: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, validation): `round(n * train_share)` examples to train, chosen by a seeded hash of the id."""
    if not 0.0 < train_share < 1.0:
        raise ValueError("the train share must be between 0 and 1 (exclusive)")
    ranked = sorted(examples, key=lambda e: (hashlib.sha256(f"{seed}:{e.example_id}".encode()).digest(), e.example_id))
    cut = round(len(ranked) * train_share)
    return sorted(ranked[:cut], key=_by_id), sorted(ranked[cut:], key=_by_id)


def _by_id(example: Example) -> str:
    return example.example_id


def flat_row(data: dict[str, Any]) -> dict[str, Any]:
    """A row for a flat table: nested objects and lists become JSON strings."""
    return {k: orjson.dumps(v).decode() if isinstance(v, (dict, list)) else v for k, v in data.items()}


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def write_rows(path: Path, rows: list[dict[str, Any]], fmt: Format) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "jsonl":
        with open(tmp, "wb") as out:
            for row in rows:
                out.write(orjson.dumps(row) + b"\n")
    elif fmt == "csv":
        flat = [flat_row(r) for r in rows]
        with open(tmp, "w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=_columns(flat))
            writer.writeheader()
            writer.writerows(flat)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            # Values of one field disagree in type across examples: keep nested ones as JSON text.
            table = pa.Table.from_pylist([flat_row(r) for r in rows])
        pq.write_table(table, tmp)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    tmp.replace(path)  # a reader never sees a half-written file


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_paths(target: str | Path, fmt: Format, request_id: str, split: bool) -> tuple[dict[str, Path], Path]:
    """({split name: data file}, manifest file). `target` is a file path, or a directory to write into."""
    out = Path(target)
    if out.is_dir() or str(target).endswith(("/", os.sep)):  # Path() drops a trailing slash
        # The id comes from a topic anyone may write to: name the file as the sink names its folder.
        out = out / f"{request_dir_name(request_id)}.{fmt}"
    suffix = f".{fmt}"
    stem = out.name[: -len(suffix)] if out.name.endswith(suffix) else out.name
    parent = out.parent
    files = {"train": parent / f"{stem}.train{suffix}", "validation": parent / f"{stem}.validation{suffix}"} if split else {"all": parent / f"{stem}{suffix}"}
    return files, parent / f"{stem}.manifest.json"


def write_export(
    examples: list[Example],
    out: str | Path,
    fmt: Format = "jsonl",
    *,
    request_id: str,
    status: RequestStatus | None = None,
    request: CreationRequest | None = None,
    split: float | None = None,
    seed: int = 0,
) -> Path:
    """Write the data files and the manifest; returns the manifest's path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    distinct = sorted({e.example_id: e for e in examples}.values(), key=_by_id)
    files, manifest_path = output_paths(out, fmt, request_id, split is not None)
    parts = dict(zip(("train", "validation"), split_examples(distinct, split, seed))) if split is not None else {"all": distinct}
    entries = []
    for name, part in parts.items():
        path = files[name]
        write_rows(path, [e.data for e in part], fmt)
        entries.append({"split": name, "name": path.name, "rows": len(part), "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    manifest = _manifest(distinct, request_id, fmt, status, request, split, seed, entries)
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    tmp.replace(manifest_path)
    return manifest_path


def _manifest(
    examples: list[Example],
    request_id: str,
    fmt: str,
    status: RequestStatus | None,
    request: CreationRequest | None,
    split: float | None,
    seed: int,
    files: list[dict[str, Any]],
) -> dict[str, Any]:
    schema = None
    if request is not None:
        schema = example_schema(request.formatting_example, request.label_field, request.label_space, request.allow_extra_keys)
    elif examples:
        schema = example_schema(examples[0].data)
    models = sorted({e.model for e in examples})
    strategies = sorted({e.strategy.value for e in examples})
    final = status is not None and status.state.final
    return {
        "request_id": request_id,
        "created_at": time.time(),
        "format": fmt,
        "complete": final and status is not None and status.state is RequestState.COMPLETED,
        "state": status.state.value if status else None,
        "model": (status.model if status and status.model else None) or (models[0] if len(models) == 1 else models or None),
        "strategy": (status.strategy.value if status and status.strategy else None) or (strategies[0] if len(strategies) == 1 else strategies or None),
        "instruction": request.instruction if request else None,
        "label_field": (status.label_field if status and status.label_field else None) or (request.label_field if request else None),
        "sampling": {
            "temperature": status.temperature if status and status.temperature is not None else (request.model.temperature if request else None),
            "top_p": status.top_p if status and status.top_p is not None else (request.model.top_p if request else None),
            "max_tokens": request.model.max_tokens if request else None,
        },
        "labels": _label_summary(examples, status, request),
        "counts": {
            "exported": len(examples),
            "accepted": status.accepted if status else None,
            "target": status.target_count if status else None,
            "rejected": dict(status.rejected) if status else None,
            "llm_calls": status.llm_calls if status else None,
            "failed_calls": status.failed_calls if status else None,
        },
        "cost": {
            "usd": status.cost_usd if status else None,
            "usd_per_example": (status.cost_usd / status.accepted) if status and status.accepted else None,
            "prompt_tokens": status.prompt_tokens if status else None,
            "completion_tokens": status.completion_tokens if status else None,
        },
        "split": {"train_share": split, "seed": seed, "by": "sha256(seed:example_id)"} if split is not None else None,
        "example_schema": schema,
        "files": files,
    }


def _label_summary(examples: list[Example], status: RequestStatus | None, request: CreationRequest | None) -> dict[str, Any] | None:
    """Exported rows per label, beside the label plan's targets (None when no label is known)."""
    field = (status.label_field if status else None) or (request.label_field if request else None)
    if not field:
        return None
    counts: dict[str, int] = {}
    for example in examples:
        text = label_of(example.data, field)
        if text is not None:
            counts[text] = counts.get(text, 0) + 1
    return {
        "plan": request.label_plan if request else None,
        "distribution": request.label_distribution if request else None,
        "exported": dict(sorted(counts.items())),
        "targets": status.label_targets if status else None,
    }


# -- reading the bus ------------------------------------------------------------------------


async def find_request(settings: Settings, request_id: str) -> CreationRequest | None:
    """The CreationRequest from the requests topic (None when it is no longer there)."""
    found: CreationRequest | None = None
    async for record in read_to_end(settings, settings.topics.requests):
        try:
            message = decode_request(record.value)
        except PoisonMessage:
            continue
        if isinstance(message, CreationRequest) and message.request_id == request_id:
            found = message
    return found


class UnknownRequest(LookupError):
    """Nothing on the bus names the request: no status, no request and no example."""


async def export_request(
    settings: Settings,
    request_id: str,
    out: str | Path,
    fmt: Format = "jsonl",
    *,
    split: float | None = None,
    seed: int = 0,
) -> Path:
    """Read the request's examples, status and request from the bus and export them."""
    status = await latest_status(settings, request_id)
    examples = await collect_examples(settings, request_id)
    request = await find_request(settings, request_id)
    if status is None and request is None and not examples:
        raise UnknownRequest(f"no request {request_id!r} on the bus (no status, request or examples for it)")
    if status is None:
        log.warning("request %s has no status: exporting the %d examples found", request_id, len(examples))
    elif not status.state.final:
        log.warning("request %s is %s, not final: the export holds the %d examples so far", request_id, status.state.value, len(examples))
    return write_export(examples, out, fmt, request_id=request_id, status=status, request=request, split=split, seed=seed)


async def export_command(
    settings: Settings, request_id: str, fmt: Format, out: str | Path, split: float | None = None, seed: int = 0
) -> Path:
    """`datacreator export`: writes the files, prints a summary to stderr, returns the manifest path."""
    manifest_path = await export_request(settings, request_id, out, fmt, split=split, seed=seed)
    manifest = orjson.loads(manifest_path.read_bytes())
    if manifest["state"] is None or manifest["state"] in ("ACCEPTED", "RUNNING"):
        print(f"warning: request {request_id} is {manifest['state'] or 'unknown'}; the export may be incomplete", file=sys.stderr)
    for entry in manifest["files"]:
        print(f"{entry['name']}: {entry['rows']} rows", file=sys.stderr)
    print(f"manifest: {manifest_path}", file=sys.stderr)
    return manifest_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("request_id")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="jsonl")
    parser.add_argument("--out", required=True, help="output file (or a directory: <request_id>.<format> inside it)")
    parser.add_argument("--split", type=float, default=None, help="train share, e.g. 0.9: writes <stem>.train and <stem>.validation")
    parser.add_argument("--seed", type=int, default=0)


async def main(args: argparse.Namespace) -> int:
    from datacreator.cli import UsageError

    try:
        await export_command(Settings(), args.request_id, args.fmt, args.out, split=args.split, seed=args.seed)
    except UnknownRequest as exc:
        raise UsageError(str(exc)) from None
    return 0

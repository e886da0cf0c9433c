"""The sink service (`datacreator serve sink`): the examples topic as rolling JSONL files on disk.

Files: `{dir}/{request_id}/part-{partition}-{seq:05d}.jsonl`, one Example message (with its id,
request, strategy and provenance; the training row is its `data`) per line, a new file every
`shard_rows` rows.

Restart safety: a row is written and fsync'ed before `handle` returns, and the runner commits
an offset only after `handle` returned, so a crash loses nothing that was committed. Whatever
was written but not committed comes again; on assignment the sink reads back the files of its
partitions, cuts a torn last line and rebuilds the set of ids already written, so a redelivery
(or the same example published twice upstream) is not written twice.

Replicas must share one directory: a partition's files move with the partition.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson

from datacreator.bus.runtime import BaseHandler, Context, Delivery, Output
from datacreator.config import Settings
from datacreator.contracts import Example

log = logging.getLogger(__name__)

DEFAULT_DIR = "./sink"
DEFAULT_SHARD_ROWS = 10_000
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_SHARD = re.compile(r"^part-(\d+)-(\d{5,})\.jsonl$")


def request_dir_name(request_id: str) -> str:
    """The request id itself when it is a safe file name, else a digest of it."""
    if _SAFE_NAME.match(request_id) and request_id not in (".", ".."):
        return request_id
    return "_" + hashlib.sha256(request_id.encode()).hexdigest()[:32]


def shard_name(partition: int, seq: int) -> str:
    return f"part-{partition}-{seq:05d}.jsonl"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Shard:
    seq: int
    rows: int
    handle: IO[bytes] | None = None


@dataclass
class PartitionFiles:
    """Everything the sink wrote for one partition: ids already written, and the open shards."""

    directory: Path
    partition: int
    shard_rows: int
    fsync: bool = True
    seen: set[str] = field(default_factory=set)
    shards: dict[str, _Shard] = field(default_factory=dict)  # request dir name -> current shard

    def load(self) -> None:
        """Read back this partition's files: repair a torn last line, collect ids and shard positions."""
        self.seen.clear()
        self.shards.clear()
        if not self.directory.is_dir():
            return
        for request_dir in sorted(p for p in self.directory.iterdir() if p.is_dir()):
            for path in sorted(request_dir.glob(f"part-{self.partition}-*.jsonl")):
                match = _SHARD.match(path.name)
                if match is None or int(match.group(1)) != self.partition:
                    continue
                rows = self._read_shard(path)
                seq = int(match.group(2))
                current = self.shards.get(request_dir.name)
                if current is None or seq > current.seq:
                    self.shards[request_dir.name] = _Shard(seq, rows)

    def _read_shard(self, path: Path) -> int:
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            # The process died in the middle of a write: that row was never committed, it comes again.
            log.warning("sink: cutting a torn line of %d bytes at the end of %s", len(data) - keep, path)
            with open(path, "r+b") as out:
                out.truncate(keep)
                out.flush()
                os.fsync(out.fileno())
            data = data[:keep]
        rows = 0
        for line in data.splitlines():
            if not line.strip():
                continue
            rows += 1
            try:
                self.seen.add(orjson.loads(line)["example_id"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.warning("sink: unreadable row in %s", path)
        return rows

    def append(self, example: Example) -> bool:
        """Write one example unless it was written before; True when written."""
        if example.example_id in self.seen:
            return False
        name = request_dir_name(example.request_id)
        shard = self.shards.get(name)
        if shard is None:
            shard = self.shards[name] = _Shard(0, 0)
        if shard.rows >= self.shard_rows:
            self._close(shard)
            shard.seq += 1
            shard.rows = 0
        if shard.handle is None:
            folder = self.directory / name
            new_folder = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / shard_name(self.partition, shard.seq)
            new_file = not path.exists()
            shard.handle = open(path, "ab")
            if self.fsync and new_file:  # the new directory entries must survive a crash too
                _fsync_dir(folder)
                if new_folder:
                    _fsync_dir(self.directory)
        shard.handle.write(orjson.dumps(example.model_dump(mode="json")) + b"\n")
        shard.handle.flush()
        if self.fsync:
            os.fsync(shard.handle.fileno())
        shard.rows += 1
        self.seen.add(example.example_id)
        return True

    def _close(self, shard: _Shard) -> None:
        if shard.handle is not None:
            shard.handle.close()
            shard.handle = None

    def close(self) -> None:
        for shard in self.shards.values():
            self._close(shard)


class SinkHandler(BaseHandler):
    """Consumes the examples topic in order per partition and appends each new example to its shard.

    `directory` falls back to DATACREATOR_SINK_DIR (default ./sink), `shard_rows` to
    DATACREATOR_SINK_SHARD_ROWS (default 10000), `fsync` to DATACREATOR_SINK_FSYNC (default on).
    """

    name = "sink"
    ordered = True

    def __init__(
        self,
        settings: Settings,
        directory: str | Path | None = None,
        shard_rows: int | None = None,
        fsync: bool | None = None,
    ) -> None:
        self.settings = settings
        self.inputs = {settings.topics.examples: Example}
        self.directory = Path(directory or settings.sink_dir)
        rows = shard_rows or settings.sink_shard_rows
        if rows < 1:
            raise ValueError("shard_rows must be at least 1")
        self.shard_rows = int(rows)
        self.fsync = settings.sink_fsync if fsync is None else bool(fsync)
        self.written = 0
        self.duplicates = 0
        self._partitions: dict[int, PartitionFiles] = {}

    async def start(self, ctx: Context) -> None:
        await super().start(ctx)
        self.directory.mkdir(parents=True, exist_ok=True)
        log.info("sink: writing %s to %s (%d rows per file)", self.topics[0], self.directory.resolve(), self.shard_rows)

    async def stop(self) -> None:
        for files in self._partitions.values():
            files.close()
        self._partitions.clear()

    async def on_assigned(self, partitions: set[int]) -> None:
        for partition in partitions:
            await self._open(partition)

    async def on_revoked(self, partitions: set[int]) -> None:
        for partition in partitions:
            files = self._partitions.pop(partition, None)
            if files is not None:
                files.close()

    async def _open(self, partition: int) -> PartitionFiles:
        files = self._partitions.get(partition)
        if files is None:
            files = PartitionFiles(self.directory, partition, self.shard_rows, self.fsync)
            await asyncio.to_thread(files.load)
            self._partitions[partition] = files
        return files

    async def handle(self, example: Example, delivery: Delivery) -> list[Output]:
        files = await self._open(delivery.partition)
        if await asyncio.to_thread(files.append, example):
            self.written += 1
        else:
            self.duplicates += 1
        return []

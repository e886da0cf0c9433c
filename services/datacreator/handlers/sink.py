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

Memory: a request's ids and open file are held while it writes; `final_state_ttl_s` after its last
example they are let go (the sink reads no statuses, so the hold runs from the last row, not from
the final status). A request that writes again is read back from its files first, so a release never
lets a duplicate through; it only costs a read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import threading
import time
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
class _RequestFiles:
    seen: set[str]
    shard: _Shard
    touched: float  # time.monotonic() of its last row (or of its read-back)


@dataclass
class PartitionFiles:
    """Everything the sink wrote for one partition: per request, the ids already written and its open shard.

    `append` runs in a worker thread and `release_idle` in another; the lock keeps them apart.
    """

    directory: Path
    partition: int
    shard_rows: int
    fsync: bool = True
    release_after_s: float | None = None
    requests: dict[str, _RequestFiles] = field(default_factory=dict)  # request dir name ->
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self) -> None:
        """Read back this partition's files: repair torn last lines; hold the ids of requests written lately."""
        with self._lock:
            self._close_all()
            self.requests.clear()
            if not self.directory.is_dir():
                return
            recent = None if self.release_after_s is None else time.time() - self.release_after_s
            for request_dir in sorted(p for p in self.directory.iterdir() if p.is_dir()):
                shards = self._shards_of(request_dir)
                if not shards:
                    continue
                newest = shards[-1][1]
                if recent is not None and newest.stat().st_mtime < recent:
                    _cut_torn_line(newest)  # idle for long: read back only if it writes again
                    continue
                self.requests[request_dir.name] = self._read_request(shards)

    def _shards_of(self, request_dir: Path) -> list[tuple[int, Path]]:
        found = []
        for path in request_dir.glob(f"part-{self.partition}-*.jsonl"):
            match = _SHARD.match(path.name)
            if match is not None and int(match.group(1)) == self.partition:
                found.append((int(match.group(2)), path))
        return sorted(found)

    def _read_request(self, shards: list[tuple[int, Path]]) -> _RequestFiles:
        seen: set[str] = set()
        rows = 0
        for _, path in shards:
            rows = self._read_shard(path, seen)
        seq = shards[-1][0] if shards else 0
        return _RequestFiles(seen, _Shard(seq, rows if shards else 0), time.monotonic())

    def _read_shard(self, path: Path, seen: set[str]) -> int:
        data = _cut_torn_line(path, path.read_bytes())
        rows = 0
        for line in data.splitlines():
            if not line.strip():
                continue
            rows += 1
            try:
                seen.add(orjson.loads(line)["example_id"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.warning("sink: unreadable row in %s", path)
        return rows

    def append(self, example: Example) -> bool:
        """Write one example unless it was written before; True when written."""
        with self._lock:
            return self._append(example)

    def _append(self, example: Example) -> bool:
        name = request_dir_name(example.request_id)
        entry = self.requests.get(name)
        if entry is None:  # new, or let go while idle: what it wrote is on disk
            entry = self.requests[name] = self._read_request(self._shards_of(self.directory / name))
        entry.touched = time.monotonic()
        if example.example_id in entry.seen:
            return False
        shard = entry.shard
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
        entry.seen.add(example.example_id)
        return True

    def release_idle(self, now: float | None = None) -> int:
        """Let go of the requests that wrote nothing for `release_after_s`; how many went."""
        if self.release_after_s is None:
            return 0
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [name for name, entry in self.requests.items() if now - entry.touched >= self.release_after_s]
            for name in idle:
                self._close(self.requests.pop(name).shard)
        return len(idle)

    def held(self) -> int:
        """Example ids held in memory."""
        return sum(len(entry.seen) for entry in self.requests.values())

    def _close(self, shard: _Shard) -> None:
        if shard.handle is not None:
            shard.handle.close()
            shard.handle = None

    def _close_all(self) -> None:
        for entry in self.requests.values():
            self._close(entry.shard)

    def close(self) -> None:
        with self._lock:
            self._close_all()


def _cut_torn_line(path: Path, data: bytes | None = None) -> bytes:
    """The file's bytes up to its last newline; a torn tail (a write cut by a crash) is cut off the file."""
    if data is None:
        with open(path, "rb") as probe:
            probe.seek(0, os.SEEK_END)
            if probe.tell() == 0:
                return b""
            probe.seek(-1, os.SEEK_END)
            if probe.read(1) == b"\n":
                return b""  # whole lines only; the caller does not need them
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
    return data


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
        self.directory = Path(directory or settings.sink.dir)
        rows = shard_rows or settings.sink.shard_rows
        if rows < 1:
            raise ValueError("shard_rows must be at least 1")
        self.shard_rows = int(rows)
        self.fsync = settings.sink.fsync if fsync is None else bool(fsync)
        self.written = 0
        self.duplicates = 0
        self.release_after_s = settings.runtime.final_state_ttl_s
        self._partitions: dict[int, PartitionFiles] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, ctx: Context) -> None:
        await super().start(ctx)
        self.directory.mkdir(parents=True, exist_ok=True)
        log.info("sink: writing %s to %s (%d rows per file)", self.topics[0], self.directory.resolve(), self.shard_rows)
        self._sweeper = asyncio.create_task(self._release_idle(), name="sink-release")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for files in self._partitions.values():
            files.close()
        self._partitions.clear()

    def held_requests(self) -> int:
        return sum(len(files.requests) for files in self._partitions.values())

    async def release_idle(self) -> int:
        """Let go of idle requests on every partition; how many went."""
        return sum([await asyncio.to_thread(files.release_idle) for files in list(self._partitions.values())])

    async def _release_idle(self) -> None:
        while True:
            await asyncio.sleep(min(max(self.release_after_s / 4, 0.1), 30.0))
            await self.release_idle()

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
            files = PartitionFiles(self.directory, partition, self.shard_rows, self.fsync, self.release_after_s)
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

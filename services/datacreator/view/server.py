"""`datacreator view`: a local web page of the requests on a bus, and the JSON API behind it.

The server reads the requests, status, examples and rejected topics from the beginning and keeps
following them (it never writes to the bus); the page polls the API once a second. Diversity
figures are computed in a thread, at most every few seconds per request, so the loop stays free.
Nothing of the endpoint configuration (keys, URLs) is served.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from datacreator.bus.codec import PoisonMessage, decode, decode_request
from datacreator.bus.readback import follow_topics
from datacreator.config import Settings
from datacreator.contracts import CreationRequest, Example, Rejection, RequestStatus
from datacreator.view.store import ViewStore

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
EXPORT_FORMATS = ("jsonl", "parquet", "csv")


def embeddings_available() -> bool:
    return importlib.util.find_spec("sentence_transformers") is not None


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def _int(request: Request, name: str, default: int) -> int:
    try:
        return int(request.query_params.get(name, default))
    except ValueError:
        return default


def _not_found(request_id: str) -> Response:
    return _JSON({"error": f"no request {request_id!r}"}, status_code=404)


def build_app(store: ViewStore) -> Starlette:
    """The page and its API over a store (the store may be fed by anything: tests feed it directly)."""

    def index_of(request: Request):  # type: ignore[no-untyped-def]
        return store.get(request.path_params["request_id"])

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def requests(request: Request) -> Response:
        return _JSON({"requests": store.listing()})

    async def one(request: Request) -> Response:
        index = index_of(request)
        return _JSON(index.detail()) if index else _not_found(request.path_params["request_id"])

    async def examples(request: Request) -> Response:
        index = index_of(request)
        if index is None:
            return _not_found(request.path_params["request_id"])
        offset, limit, query = _int(request, "offset", 0), _int(request, "limit", 50), request.query_params.get("q") or None
        if query:  # a search scans every kept example: off the loop
            return _JSON(await asyncio.to_thread(index.page, offset, limit, query))
        return _JSON(index.page(offset, limit))

    async def rejections(request: Request) -> Response:
        index = index_of(request)
        return _JSON(index.rejection_samples()) if index else _not_found(request.path_params["request_id"])

    async def lineage(request: Request) -> Response:
        index = index_of(request)
        if index is None:
            return _not_found(request.path_params["request_id"])
        found = index.lineage(request.query_params.get("parent"), request.query_params.get("path"), _int(request, "limit", 200))
        return _JSON(found) if found is not None else _JSON({"error": "no such example in this request"}, status_code=404)

    async def export(request: Request) -> Response:
        from datacreator.export import write_export

        index = index_of(request)
        if index is None:
            return _not_found(request.path_params["request_id"])
        fmt = request.path_params["fmt"]
        if fmt not in EXPORT_FORMATS:
            return _JSON({"error": f"format must be one of {', '.join(EXPORT_FORMATS)}"}, status_code=400)
        folder = Path(tempfile.mkdtemp(prefix="datacreator-view-"))
        rows = list(index.rows)

        def write() -> Path:
            manifest = write_export([r.example() for r in rows], folder / f"export.{fmt}", fmt,  # type: ignore[arg-type]
                                    request_id=index.request_id, status=index.status, request=index.request)
            if request.query_params.get("manifest"):
                return manifest
            return folder / orjson.loads(manifest.read_bytes())["files"][0]["name"]

        path = await asyncio.to_thread(write)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in index.request_id)
        name = f"{safe}.manifest.json" if path.name.endswith(".manifest.json") else f"{safe}.{fmt}"
        return FileResponse(path, filename=name, background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True))

    routes = [
        Route("/", page),
        Route("/api/requests", requests),
        Route("/api/requests/{request_id}", one),
        Route("/api/requests/{request_id}/examples", examples),
        Route("/api/requests/{request_id}/rejections", rejections),
        Route("/api/requests/{request_id}/lineage", lineage),
        Route("/api/requests/{request_id}/export.{fmt}", export),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)


class ViewServer:
    """The page on 127.0.0.1:port, fed by a reader of the bus."""

    def __init__(self, settings: Settings, port: int = 8765, host: str = "127.0.0.1", *,
                 embeddings: bool | None = None, max_examples: int = 200_000, diversity_every_s: float = 3.0) -> None:
        self.settings = settings
        self.host, self.port = host, port
        self.store = ViewStore(max_examples=max_examples)
        self.embeddings = embeddings_available() if embeddings is None else embeddings
        self.diversity_every_s = diversity_every_s
        self.app = build_app(self.store)
        self._tasks: list[asyncio.Task[None]] = []
        self._server: uvicorn.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    async def start(self) -> ViewServer:
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # the CLI owns signals
        self._tasks = [asyncio.create_task(self._server.serve(), name="view-http"),
                       asyncio.create_task(self._read(), name="view-reader"),
                       asyncio.create_task(self._diversity(), name="view-diversity")]
        for _ in range(200):
            if self._server.started or self._tasks[0].done():
                break
            await asyncio.sleep(0.05)
        if self._tasks[0].done():
            await self.stop()
            raise OSError(f"the view cannot listen on {self.host}:{self.port} (is the port in use? try --port/--view-port)")
        if self.port == 0:
            self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        for task in self._tasks[1:]:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
        self._tasks = []

    async def _read(self) -> None:
        topics = self.settings.topics
        async for record in follow_topics(self.settings, [topics.requests, topics.status, topics.examples, topics.rejected]):
            try:
                if record.topic == topics.examples:
                    self.store.add_example(decode(Example, record.value), record.value)
                elif record.topic == topics.status:
                    self.store.add_status(decode(RequestStatus, record.value))
                elif record.topic == topics.rejected:
                    self.store.add_rejection(decode(Rejection, record.value))
                else:
                    message = decode_request(record.value)
                    if isinstance(message, CreationRequest):
                        self.store.add_request(message)
            except PoisonMessage:
                continue  # the services send such records to the DLQ; the view skips them

    async def _diversity(self) -> None:
        """Distinct-2 of each request whose examples grew, every few seconds; the mean embedding
        distance beside it, computed one request at a time in the background (it takes seconds on a
        busy CPU, and the model takes seconds to load), carried forward until recomputed."""
        from datacreator.report import mean_pairwise_distance

        done: dict[str, int] = {}
        distances: dict[str, tuple[int, float | None]] = {}  # request -> (examples then, distance)
        loading: asyncio.Task[Any] | None = None
        measuring: asyncio.Task[None] | None = None

        async def measure(request_id: str, count: int, texts: list[str], embedder: Any) -> None:
            value = await asyncio.to_thread(mean_pairwise_distance, texts, embedder, 300)
            distances[request_id] = (count, None if value is None else round(value, 4))

        while True:
            await asyncio.sleep(self.diversity_every_s)
            embedder = None
            if self.embeddings:
                if loading is None:
                    from datacreator.minilm import shared_embedder

                    loading = asyncio.create_task(asyncio.to_thread(shared_embedder))
                if loading.done():
                    if loading.exception() is not None:
                        log.warning("view: no embedding distance (%s)", loading.exception())
                        self.embeddings = False
                    else:
                        embedder = loading.result()
            for request_id, index in list(self.store.requests.items()):
                count = len(index.ids) + index.dropped
                measured = distances.get(request_id, (0, None))
                if count >= 2 and embedder is not None and measured[0] != count and (measuring is None or measuring.done()):
                    texts = await asyncio.to_thread(index.diversity_texts)
                    measuring = asyncio.create_task(measure(request_id, count, texts, embedder))
                if count < 2 or done.get(request_id) == count + measured[0]:
                    continue
                done[request_id] = count + measured[0]
                texts = await asyncio.to_thread(index.diversity_texts)
                await asyncio.to_thread(index.record_diversity, texts, measured[1])


# -- the command -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (the page has no login: keep it local)")
    parser.add_argument("--no-embeddings", dest="embeddings", action="store_false", default=None,
                        help="skip the mean embedding distance")
    parser.add_argument("--max-examples", type=int, default=200_000, help="examples kept per request for the table")


async def main(args: argparse.Namespace) -> int:
    from datacreator.bus.runtime import install_signal_handlers

    settings = Settings()
    from datacreator.bus.admin import probe

    if settings.kafka.security_protocol == "PLAINTEXT":
        await probe(settings.kafka.bootstrap)  # an unreachable broker is a one-line error, not a page that stays empty
    stopped = asyncio.Event()
    install_signal_handlers(stopped.set)
    server = await ViewServer(settings, args.port, args.host, embeddings=args.embeddings, max_examples=args.max_examples).start()
    print(f"datacreator view: {server.url} (reading {settings.kafka.bootstrap}); Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        await stopped.wait()
    finally:
        await server.stop()
    return 0

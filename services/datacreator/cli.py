"""The `datacreator` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from datacreator.config import Settings
from datacreator.contracts import RequestStatus

log = logging.getLogger("datacreator")


class UsageError(Exception):
    """Bad input from the person at the terminal: one line on stderr, exit code 2."""


def _validation_lines(exc: Exception) -> list[str]:
    """One line per pydantic error, naming the field by its dotted path."""
    lines = []
    for error in exc.errors():  # type: ignore[attr-defined]
        where = ".".join(str(part) for part in error.get("loc", ())) or "request"
        lines.append(f"  {where}: {error.get('msg', 'invalid')}")
    return lines


def _user_error(exc: BaseException, args: argparse.Namespace | None) -> str | None:
    """The message for an error caused by the input or the surroundings, or None for a bug."""
    import orjson
    from pydantic import ValidationError

    if isinstance(exc, UsageError):
        return str(exc)
    if isinstance(exc, ValidationError):
        return "\n".join([f"invalid {exc.title} ({exc.error_count()} errors):" if exc.error_count() > 1 else f"invalid {exc.title}:",
                          *_validation_lines(exc)])
    if isinstance(exc, orjson.JSONDecodeError):
        return f"{getattr(args, 'request', 'input')}: not valid JSON ({exc})"
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename}: no such file"
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename}: is a directory, not a file"
    if isinstance(exc, PermissionError):
        return f"{exc.filename}: permission denied"
    if type(exc).__name__ == "TopicMismatch":  # the bus's topics need an operator: its message says what
        return str(exc)
    if any(c.__module__.startswith("aiokafka.") and c.__name__ == "KafkaError" for c in type(exc).__mro__):
        # matched by name: only bus code imports the Kafka client
        bootstrap = Settings().kafka.bootstrap
        return (f"cannot reach the Kafka broker at {bootstrap} ({type(exc).__name__}); "
                "is the bus up? start one with `datacreator up`, or set DATACREATOR_KAFKA_BOOTSTRAP")
    return None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # aiokafka reports every reconnect at WARNING and a refused connection at ERROR: both are
    # expected around restarts, and an unreachable broker is reported once, by main()
    quiet = logging.CRITICAL if logging.getLevelName(level.upper()) > logging.DEBUG else logging.DEBUG
    logging.getLogger("aiokafka").setLevel(quiet)


def _summary(status: RequestStatus, wall_s: float, out: str | None) -> str:
    lines = [
        f"request      {status.request_id}: {status.state.value}" + (f" ({status.error})" if status.error else ""),
        f"accepted     {status.accepted} of {status.target_count}" + (f"  -> {out}" if out else ""),
    ]
    rejected = sum(status.rejected.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(status.rejected.items(), key=lambda kv: -kv[1]))
    lines.append(f"rejected     {rejected}" + (f" ({reasons})" if reasons else ""))
    lines.append(f"llm calls    {status.llm_calls} ({status.failed_calls} failed)")
    lines.append(f"tokens       {status.prompt_tokens} prompt + {status.completion_tokens} completion")
    lines.append(f"cost         ${status.cost_usd:.6f}")
    lines.append(f"wall time    {wall_s:.1f} s ({status.accepted / wall_s if wall_s else 0:.2f} examples/s)")
    return "\n".join(lines)


class _Progress:
    """A progress bar on a terminal, plain lines elsewhere."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), disable=not enabled or not sys.stderr.isatty(), transient=False,
        )
        self.task = self.progress.add_task("examples", total=total, info="")
        self._last_line = 0.0

    def __enter__(self) -> _Progress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, status: RequestStatus) -> None:
        rejected = sum(status.rejected.values())
        info = f"{status.state.value} | rejected {rejected} | calls {status.llm_calls} | ${status.cost_usd:.4f}"
        self.progress.update(self.task, completed=status.accepted, total=status.target_count or None, info=info)
        if self.enabled and not sys.stderr.isatty() and (time.monotonic() - self._last_line > 5 or status.state.final):
            self._last_line = time.monotonic()
            print(f"  {status.accepted}/{status.target_count} accepted; {info}", file=sys.stderr)


# -- commands -------------------------------------------------------------------------------


def _llm_options(args: argparse.Namespace) -> dict[str, object]:
    if args.llm == "embedded":
        # The embedded server answers one call at a time, so a call may wait behind several others.
        return {"read_timeout_s": 600.0, "total_timeout_s": 900.0}
    if args.llm.startswith(("http://", "https://")) and os.environ.get(args.api_key_env):
        return {"api_key_env": args.api_key_env}  # the name travels, never the key
    return {}


def _concurrency(args: argparse.Namespace, servers: int = 1) -> dict[str, int]:
    """LLM calls in flight: --concurrency, else one per embedded server process (`run` and `up`),
    8 for `run` elsewhere, and the endpoint's own default for `up` elsewhere.

    An embedded llama.cpp server runs one completion at a time: more calls in flight only queue
    inside it, where their read timeouts run (8 at once on a loaded machine timed out, opened the
    circuit and stalled a request at 35 of 140), while queued here they wait without a deadline."""
    given = getattr(args, "concurrency", None)
    if given:
        return {"max_concurrency": int(given)}
    if getattr(args, "llm", None) == "embedded":
        return {"max_concurrency": servers}
    return {"max_concurrency": 8} if hasattr(args, "concurrency") else {}


def _endpoints(args: argparse.Namespace, target: object, settings: Settings) -> str:
    """The endpoints JSON of `run`/`up`: the `default` built from --llm, merged with what
    DATACREATOR_ENDPOINTS_FILE / _JSON say (they may add endpoints, prices, limits), then the price flags."""
    import json

    from datacreator.stack import endpoint_json

    options = {**_llm_options(args), **_concurrency(args, 1 + len(target.base_urls))}  # type: ignore[attr-defined]
    config: dict[str, dict[str, object]] = json.loads(endpoint_json(target, **options))
    given: dict[str, dict[str, object]] = {}
    if settings.endpoints_file:
        given.update(json.loads(Path(settings.endpoints_file).read_text()))
    if settings.endpoints_json:
        given.update(json.loads(settings.endpoints_json))
    for alias, values in given.items():
        config[alias] = {**config.get(alias, {}), **values}
    if args.price_in is not None:
        config["default"]["input_price_per_1m"] = args.price_in
    if args.price_out is not None:
        config["default"]["output_price_per_1m"] = args.price_out
    return json.dumps(config)


def _warn_unpriced(settings: Settings, request: object | None = None) -> None:
    """Once: a cost budget cannot trigger on an endpoint whose prices are 0."""
    endpoints = settings.endpoints
    if request is not None:
        budget = request.budget.max_cost_usd  # type: ignore[attr-defined]
        endpoint = endpoints.get(request.model.endpoint)  # type: ignore[attr-defined]
        if budget and endpoint is not None and not (endpoint.input_price_per_1m or endpoint.output_price_per_1m):
            print(f"datacreator: warning: the request has max_cost_usd {budget} but endpoint "
                  f"{request.model.endpoint!r} has no prices, so its cost stays $0 and the budget "  # type: ignore[attr-defined]
                  "never triggers; give --price-in/--price-out", file=sys.stderr)
        return
    unpriced = [alias for alias, e in endpoints.items() if not (e.input_price_per_1m or e.output_price_per_1m)]
    if unpriced:
        print(f"datacreator: note: endpoint(s) {', '.join(unpriced)} have no prices: a request's max_cost_usd "
              "will not trigger on them (--price-in/--price-out)", file=sys.stderr)


async def _run(args: argparse.Namespace) -> int:
    from datacreator import remote
    from datacreator.stack import EmbeddedStack, start_llm, stop_llm

    request = remote.load_request(
        args.request, target_count=args.target_count, strategy=args.strategy, request_id=args.request_id,
        examples_per_call=args.examples_per_call,
    )
    print(f"datacreator: starting the embedded stack (broker, {args.llm} LLM, planner, generator, curator)", file=sys.stderr)
    target = await start_llm(args.llm, args.model, servers=args.llm_servers, threads=args.llm_threads)
    base = Settings()
    stack = EmbeddedStack(base)
    view = None
    try:
        settings = await stack.start(endpoints_json=_endpoints(args, target, base), endpoints_file=None)
        _warn_unpriced(settings, request)
        view = await _start_view(args, settings)
        started = time.monotonic()
        writer = remote.JsonlWriter(args.out, with_metadata=args.with_metadata) if args.out else None
        streaming = asyncio.create_task(remote.stream_examples(settings, request.request_id, writer)) if writer is not None else None
        try:
            await remote.submit(settings, request)
            try:
                with _Progress(request.target_count, enabled=not args.quiet) as progress:
                    final = await remote.wait_for_final(settings, request.request_id, progress.update, timeout_s=args.timeout)
            except TimeoutError as exc:
                kept = f"; the {writer.written} examples created so far are in {args.out}" if writer is not None else ""
                print(f"datacreator run: {exc}{kept}", file=sys.stderr)
                return 1
            wall = time.monotonic() - started
            if writer is not None:
                # The follower may lag the final status: a full read fills in whatever it has not seen yet.
                for example in await remote.collect_examples(settings, request.request_id):
                    writer.add(example)
        finally:
            if streaming is not None:
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await streaming
            if writer is not None:
                writer.close()
        print(_summary(final, wall, args.out))
        if view is not None and args.view_linger:
            print(f"datacreator: the view stays at {view.url} for {args.view_linger:g} s", file=sys.stderr)
            await asyncio.sleep(args.view_linger)
        return 0 if final.state.value == "COMPLETED" else 1
    finally:
        if view is not None:
            await view.stop()
        await stack.stop()
        await stop_llm(target)


async def _start_view(args: argparse.Namespace, settings: Settings):  # type: ignore[no-untyped-def]
    if not getattr(args, "view", False):
        return None
    from datacreator.view.server import ViewServer

    view = await ViewServer(settings, port=args.view_port).start()
    print(f"datacreator: the view is at {view.url}", file=sys.stderr, flush=True)
    return view


async def _submit(args: argparse.Namespace) -> int:
    from datacreator import remote

    settings = Settings()
    request = remote.load_request(args.request, target_count=args.target_count, strategy=args.strategy, request_id=args.request_id)
    await remote.submit(settings, request)
    print(request.request_id)
    if not args.wait:
        return 0
    started = time.monotonic()
    with _Progress(request.target_count) as progress:
        final = await remote.wait_for_final(settings, request.request_id, progress.update, timeout_s=args.timeout)
    print(_summary(final, time.monotonic() - started, None))
    return 0 if final.state.value == "COMPLETED" else 1


async def _status(args: argparse.Namespace) -> int:
    from datacreator import remote

    status = await remote.latest_status(Settings(), args.request_id)
    if status is None:
        raise UsageError(f"no request {args.request_id!r} on the bus (no status for it)")
    print(status.model_dump_json(indent=2))
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    from datacreator import remote
    from datacreator.export import find_request

    settings = Settings()
    # A request just submitted has no status until a planner takes it: it is then on the requests topic.
    if await remote.latest_status(settings, args.request_id) is None and await find_request(settings, args.request_id) is None:
        raise UsageError(f"no request {args.request_id!r} on the bus (no status and no request for it)")
    await remote.cancel(settings, args.request_id, args.reason)
    print(f"cancel sent for {args.request_id}")
    return 0


async def _serve(args: argparse.Namespace) -> int:
    from datacreator.serve import CORE_SERVICES, serve

    names = list(CORE_SERVICES) if args.service == "all" else [args.service]
    await serve(Settings(), names)
    return 0


async def _up(args: argparse.Namespace) -> int:
    from datacreator.bus.runtime import install_signal_handlers
    from datacreator.stack import EmbeddedStack, start_llm, stop_llm

    stopped = asyncio.Event()
    install_signal_handlers(stopped.set)  # a signal during start-up stops it once started
    target = await start_llm(args.llm, args.model, servers=args.llm_servers, threads=args.llm_threads)
    base = Settings()
    stack = EmbeddedStack(base, broker_port=args.port)
    view = None
    try:
        settings = await stack.start(endpoints_json=_endpoints(args, target, base), endpoints_file=None)
        _warn_unpriced(settings)
        view = await _start_view(args, settings)
        assert stack.group is not None
        print(f"datacreator is up: Kafka bootstrap {settings.kafka.bootstrap}", flush=True)
        print(f"  publish requests to {settings.topics.requests}; read examples from {settings.topics.examples}", flush=True)
        servers = ", ".join([target.base_url, *target.base_urls])
        print(f"  LLM: {servers} ({target.model}); metrics: {stack.group.health.url}/metrics", flush=True)
        if view is not None:
            print(f"  view: {view.url}", flush=True)
        print("  Ctrl-C stops it all", flush=True)
        await stopped.wait()
        return 0
    finally:
        if view is not None:
            await view.stop()
        await stack.stop()
        await stop_llm(target)


def _models(args: argparse.Namespace) -> int:
    from datacreator.llm import embedded

    if args.action == "list":
        for name, info in embedded.MODELS.items():
            mark = "*" if name == embedded.DEFAULT_MODEL else " "
            state = "installed" if embedded.installed(name) else "not installed"
            print(f"{mark} {name:<20} {info.size / 1e6:>6.0f} MB  {state:<13}  {info.description}")
        print("(* the default; install one with: datacreator models install NAME)")
        return 0
    if not args.name:
        print(f"datacreator models {args.action} needs a model name: {', '.join(embedded.MODELS)}", file=sys.stderr)
        return 2
    try:
        if args.action == "install":
            print(embedded.install(args.name))
        else:
            print(embedded.model_path(args.name))
    except (ValueError, embedded.ModelNotInstalled, embedded.ModelCorrupt) as exc:
        print(f"datacreator: {exc}", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Benchmarks live beside the package in a clone, not in the wheel."""
    print("datacreator: benchmarks run from a clone: python -m benchmarks --help", file=sys.stderr)
    return 2


def _schemas(args: argparse.Namespace) -> int:
    from datacreator import contract_files

    for path in contract_files.write(args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datacreator", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("DATACREATOR_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)
    from datacreator.llm.embedded import DEFAULT_MODEL, MODELS

    model_help = f"embedded model ({', '.join(MODELS)}; default {DEFAULT_MODEL}), or the model name at the given URL"
    servers_help = "embedded LLM server processes, one completion at a time each (default: 2 where there are 2 cores or more)"

    def request_overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("request", help="a CreationRequest as a JSON file")
        p.add_argument("--target-count", type=int)
        p.add_argument("--strategy", choices=["none", "random", "contrastive", "similar", "tree"])
        p.add_argument("--request-id")
        p.add_argument("--timeout", type=float, default=None, help="seconds to wait for a final state")

    def llm_prices(p: argparse.ArgumentParser) -> None:
        p.add_argument("--price-in", type=float, metavar="USD", help="price of the --llm endpoint per million prompt tokens")
        p.add_argument("--price-out", type=float, metavar="USD", help="price of the --llm endpoint per million completion tokens")

    def view_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--view", action="store_true", help="serve the web view while it runs")
        p.add_argument("--view-port", type=int, default=8765, help="port of the web view (0: any free one)")

    run = sub.add_parser("run", help="create examples end to end on the embedded stack")
    request_overrides(run)
    run.add_argument("--llm", default="embedded", help="embedded (default), simulator, or an OpenAI-compatible base URL")
    run.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key of --llm URL")
    run.add_argument("--model", help=model_help)
    run.add_argument("--llm-servers", type=int, metavar="N", help=servers_help)
    run.add_argument("--llm-threads", type=int, metavar="N", help="threads of each embedded LLM server (default: the cores shared out)")
    run.add_argument("--out", default="examples.jsonl")
    run.add_argument("--with-metadata", action="store_true", help="write whole Example messages, not only the data")
    run.add_argument("--examples-per-call", type=int)
    run.add_argument("--concurrency", type=int, help="LLM calls in flight at once (default: one per embedded LLM server, each answers one at a time; 8 elsewhere)")
    run.add_argument("--quiet", action="store_true")
    run.add_argument("--view-linger", type=float, default=0.0, metavar="S",
                     help="with --view: keep the page up S seconds after the request ends")
    llm_prices(run)
    view_options(run)
    run.set_defaults(handler=_run)

    submit = sub.add_parser("submit", help="publish a request to a running bus (DATACREATOR_KAFKA_BOOTSTRAP)")
    request_overrides(submit)
    submit.add_argument("--wait", action="store_true", help="follow the status until a final state")
    submit.set_defaults(handler=_submit)

    status = sub.add_parser("status", help="the latest status of a request")
    status.add_argument("request_id")
    status.set_defaults(handler=_status)

    cancel = sub.add_parser("cancel", help="stop a request")
    cancel.add_argument("request_id")
    cancel.add_argument("--reason", default="cancelled by user")
    cancel.set_defaults(handler=_cancel)

    serve = sub.add_parser("serve", help="run one service (or all) against the configured broker")
    serve.add_argument("service", choices=["planner", "generator", "curator", "sink", "all"])
    serve.set_defaults(handler=_serve)

    up = sub.add_parser("up", help="the long-running embedded stack, for any Kafka client")
    up.add_argument("--llm", default="embedded")
    up.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key of --llm URL")
    up.add_argument("--model", help=model_help)
    up.add_argument("--llm-servers", type=int, metavar="N", help=servers_help)
    up.add_argument("--llm-threads", type=int, metavar="N", help="threads of each embedded LLM server (default: the cores shared out)")
    up.add_argument("--port", type=int, default=9092, help="the broker's port")
    llm_prices(up)
    view_options(up)
    up.set_defaults(handler=_up)

    models = sub.add_parser("models", help="the embedded LLM models: list, install, or the path of one")
    models.add_argument("action", choices=["list", "install", "path"])
    models.add_argument("name", nargs="?")
    models.set_defaults(handler=_models, sync=True)

    bench = sub.add_parser("bench", help="benchmarks run from a clone: python -m benchmarks", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=_bench, sync=True)

    schemas = sub.add_parser("schemas", help="write the JSON Schemas and the AsyncAPI document")
    schemas.add_argument("--out", default="schemas")
    schemas.set_defaults(handler=_schemas, sync=True)

    from datacreator import top

    top_parser = sub.add_parser("top", help="a live view of a running bus: requests, throughput, cost, 429s, lag")
    top.add_arguments(top_parser)
    top_parser.set_defaults(handler=top.top_command)

    from datacreator import evaluate, export, report
    from datacreator.view import server as view_server

    view_parser = sub.add_parser("view", help="a local web page of a running bus: requests, examples, rejections, lineage")
    view_server.add_arguments(view_parser)
    view_parser.set_defaults(handler=view_server.main)

    export_parser = sub.add_parser("export", help="write a request's examples as jsonl/parquet/csv with a manifest")
    export.add_arguments(export_parser)
    export_parser.set_defaults(handler=export.main)
    report_parser = sub.add_parser("report", help="quality and cost figures of a request (and a plot)")
    report.add_arguments(report_parser)
    report_parser.set_defaults(handler=report.main)
    evaluate_parser = sub.add_parser("evaluate", help="train a classifier on created data, score it on human-labeled data")
    evaluate.add_arguments(evaluate_parser)
    evaluate_parser.set_defaults(handler=evaluate.main, sync=True)

    from datacreator.simulator import add_arguments as simulator_arguments
    from datacreator.simulator import main as simulator_main

    simulate = sub.add_parser("simulate-llm", help="run the LLM simulator (an OpenAI-compatible test server)")
    simulator_arguments(simulate)
    simulate.set_defaults(handler=simulator_main, sync=True)
    return parser


async def _until_sigterm(command: Any) -> int:
    """Run a command so that SIGTERM cancels it like Ctrl-C does: its `finally` blocks stop the
    embedded stack and the LLM server and close the output file (the default SIGTERM would skip them)."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows, nor off the main thread
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
    return int(await command or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # flags after `bench` are ignored: benchmarks run from a clone
        return _bench(argparse.Namespace(bench_args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        if getattr(args, "sync", False):
            return int(args.handler(args) or 0)
        return asyncio.run(_until_sigterm(args.handler(args)))
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:
        return 143  # SIGTERM: the command's own cleanup (stack, LLM, files) has run
    except Exception as exc:
        message = _user_error(exc, args)
        if message is None:
            raise
        if log.isEnabledFor(logging.DEBUG):
            log.debug("the traceback of the error below", exc_info=exc)
        print(f"datacreator {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m datacreator.cli`: run the imported module, so its UsageError is the one raised elsewhere
    from datacreator.cli import main as cli_main

    sys.exit(cli_main())

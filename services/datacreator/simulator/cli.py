"""`python -m datacreator.simulator`: the simulator in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from typing import Any, Literal

import uvicorn

from .app import create_app
from .config import MODEL_NAME, SimulatorConfig
from .server import bind_socket, uvicorn_config

API_KEY_ENV = "DATACREATOR_SIMULATOR_API_KEY"
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain_type(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _optional(kind: type) -> Any:
    def parse(value: str) -> Any:
        return None if value.lower() in ("none", "null", "") else kind(value)

    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for the host, the port and every `SimulatorConfig` field (--rpm, --error-rate, ...)."""
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on (default: %(default)s).")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on; 0 picks a free one (default: %(default)s).")
    for name, info in SimulatorConfig.model_fields.items():
        kind, nullable = _plain_type(info.annotation)
        help_text = (info.description or name.replace("_", " ")).replace("%", "%%")
        if name == "api_key":
            parser.add_argument(
                _flag(name), default=None, help=f"Bearer key the requests must carry; default: ${API_KEY_ENV} (unset: none)."
            )
        elif kind is bool:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=info.default, help=help_text)
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(_flag(name), choices=list(typing.get_args(kind)), default=info.default, help=f"{help_text} (default: %(default)s)")
        else:
            parse = _optional(kind) if nullable else kind
            parser.add_argument(_flag(name), type=parse, default=info.default, help=f"{help_text} (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    values = {name: getattr(args, name) for name in SimulatorConfig.model_fields if hasattr(args, name)}
    if not values.get("api_key"):
        values["api_key"] = os.environ.get(API_KEY_ENV) or None
    return SimulatorConfig(**values)


def main(args: argparse.Namespace) -> int:
    """Serve until interrupted. Returns the process exit code."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"invalid simulator settings: {exc}", file=sys.stderr)
        return 2
    host = getattr(args, "host", "127.0.0.1")
    sock = bind_socket(host, getattr(args, "port", 8000))
    port = sock.getsockname()[1]
    log_level = str(getattr(args, "log_level", None) or "warning").lower()
    if log_level not in _LOG_LEVELS:
        log_level = "warning"
    server = uvicorn.Server(uvicorn_config(create_app(config), host, port, log_level))
    print(f"datacreator LLM simulator listening on http://{host}:{port}/v1 (model {MODEL_NAME})", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datacreator.simulator", description="The datacreator LLM simulator: an OpenAI-compatible server for tests and benchmarks.")
    parser.add_argument("--log-level", default="warning", choices=_LOG_LEVELS)
    add_arguments(parser)
    return main(parser.parse_args(argv))

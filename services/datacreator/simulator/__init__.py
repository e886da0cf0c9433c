"""The datacreator LLM simulator: an OpenAI-compatible HTTP server for tests and benchmarks.

It answers the project's prompt format with made-up examples, and can play a provider's
latency, rate limits and faults on demand. Its output is never a language model's.
"""

from .app import Simulator, create_app
from .cli import add_arguments, main
from .config import MODEL_NAME, SimulatorConfig
from .server import SimulatorServer
from .stats import SimulatorStats

__all__ = [
    "MODEL_NAME",
    "Simulator",
    "SimulatorConfig",
    "SimulatorServer",
    "SimulatorStats",
    "add_arguments",
    "create_app",
    "main",
]

"""Shared fixtures: each real part (broker, simulator, Redis) comes from a plugin module.

Tests that start real parts are marked `integration`, so `pytest -m "not integration"` runs the
pure layer alone: those asking for a real part's fixture, and every test of the modules below,
which start processes, Redis clients or servers of their own.
"""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.broker",
    "tests.fixtures.simulator",
    "tests.fixtures.redis_keys",
]

REAL_PART_FIXTURES = {"broker", "fresh_broker", "bus_settings", "simulator", "make_simulator"}
REAL_PART_MODULES = {
    "test_benchmarks", "test_deploy", "test_embedded_llm", "test_embedded_stack", "test_paper_check",
    "test_procs", "test_prometheus", "test_ratelimit", "test_security", "test_top",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
        if (
            REAL_PART_FIXTURES & set(getattr(item, "fixturenames", ()))
            or module in REAL_PART_MODULES
            or "reliability" in item.nodeid.split("/")
            or item.get_closest_marker("embedded_llm")
        ):
            item.add_marker(pytest.mark.integration)

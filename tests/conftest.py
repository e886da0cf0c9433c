"""Shared fixtures: each real part (broker, simulator, Redis) comes from a plugin module."""

pytest_plugins = [
    "tests.fixtures.broker",
    "tests.fixtures.simulator",
    "tests.fixtures.redis_keys",
]

"""How long the simulator takes to answer."""

from __future__ import annotations

import math
import random

from .config import SimulatorConfig

_Z99 = 2.3263478740408408  # standard normal quantile at 0.99


def sample_latency(config: SimulatorConfig, rng: random.Random, completion_tokens: int = 0) -> float:
    """Seconds to wait before answering, drawn from the configured distribution."""
    base = config.latency_s
    if config.latency == "normal":
        delay = max(0.0, rng.gauss(base, config.latency_sd_s)) if config.latency_sd_s > 0 else base
    elif config.latency == "longtail":
        delay = longtail(rng, base, config.latency_p99_s)
    else:
        delay = base
    return delay + config.latency_per_token_s * completion_tokens


def longtail(rng: random.Random, median: float, p99: float | None) -> float:
    """Lognormal with the given median and 99th percentile (p99 defaults to 5x the median)."""
    if median <= 0:
        return 0.0
    p99 = 5 * median if p99 is None else p99
    sigma = math.log(p99 / median) / _Z99 if p99 > median else 0.0
    return rng.lognormvariate(math.log(median), sigma)

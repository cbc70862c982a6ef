"""When each session starts: a gamma process (Poisson at burstiness 1), or all at once."""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(count: int, request_rate: float, burstiness: float,
                    rng: np.random.Generator) -> list[float]:
    """Send times in seconds from the start, for `count` arrivals.

    Gaps are Gamma(shape=burstiness, scale=1/(rate*burstiness)): the mean gap stays
    1/rate while burstiness < 1 clusters arrivals and > 1 evens them out (as vLLM's
    --burstiness). An infinite rate sends everything at t=0.
    """
    if count <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * count
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be positive")
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=count)
    gaps[0] = 0.0  # the first request goes at once
    return [float(t) for t in np.cumsum(gaps)]

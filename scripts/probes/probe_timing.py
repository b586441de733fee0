"""Wall-clock timing shared by the one-run probes (probe_mosaic.py, mosaic_forward.py)."""

import time

import jax
import numpy as np


def seconds(fn, *args, n: int = 20, reps: int = 5) -> float:
    """Median over reps of the mean of n back-to-back calls (after one warm-up call)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(n)])
        ts.append((time.perf_counter() - t) / n)
    return float(np.median(ts))

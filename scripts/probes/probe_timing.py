"""Wall-clock timing and the progress line shared by the one-run probes (probe_mosaic.py, mosaic_*.py)."""

import time

import jax
import numpy as np

T0 = time.time()  # when the probe started (its first import of this module)


def elapsed() -> float:
    return time.time() - T0


def say(line: str) -> None:
    """A progress line, stamped with the seconds since the probe started."""
    print(f"[{elapsed():6.1f} s] {line}", flush=True)


def seconds(fn, *args, n: int = 20, reps: int = 5) -> float:
    """Median over reps of the mean of n back-to-back calls (after one warm-up call)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(n)])
        ts.append((time.perf_counter() - t) / n)
    return float(np.median(ts))

"""Wall-clock timing and the progress line shared by the one-run probes (probe_mosaic.py, mosaic_*.py)."""

import time

import jax
import numpy as np

from bridge.bench.timing import array_copies

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


def chained_seconds(call, carry: tuple, *args, calls: int = 16, reps: int = 5):
    """(seconds per call, whole-array copies) of `calls` chained calls carry = call(*carry, *args)
    in one jitted loop with the carry donated: a kernel that writes in place is timed without the
    copies XLA adds before an un-donated call's aliased inputs (the copy count says if any stayed)."""
    body = lambda _, c: tuple(call(*c, *args))  # noqa: E731
    compiled = jax.jit(lambda c: jax.lax.fori_loop(0, calls, body, c), donate_argnums=0).lower(carry).compile()
    copies = len(array_copies(compiled.as_text()))
    carry = jax.block_until_ready(compiled(carry))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        carry = jax.block_until_ready(compiled(carry))
        ts.append((time.perf_counter() - t) / calls)
    return float(np.median(ts)), copies

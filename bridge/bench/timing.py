"""`bi-norm bench`'s timing helpers: CUDA-graph replay timed by events for torch, a jitted on-GPU
loop (or an unrolled jit) for JAX, the rotated input sets, the copy ceiling, the check of a
peer's output against ours, and one implementation's build-check-time step (any pass). torch and
jax are imported inside the functions only.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

from .plan import CHECK_ROWS, CHECK_TOL, JAX_CALL_S, JAX_SETS, MAX_REPS, MEASURE_S, MIN_REPS, Case, Skip, Timing


def _reps(estimate_s: float) -> int:
    return max(MIN_REPS, min(MAX_REPS, int(MEASURE_S / max(estimate_s, 1e-6))))


def time_torch(fn: Callable, sets: Sequence[tuple], stream=None,
               refresh: Optional[Callable[[], None]] = None) -> Tuple[float, str]:
    """Median µs per call: fn over every set, captured in one CUDA graph, timed by events around replays.

    stream: where the warm-up and the capture run (default: a side stream, the graph's own); an
    autograd backward runs on the stream its forward ran on, so it is captured there. refresh:
    called before every replay, outside the timed events: fresh inputs for an op that overwrites them.
    """
    import torch

    side = stream or torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants: compiles, autotunes
        for args in sets[:2]:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    note = ""
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: JAX's runtime threads may call CUDA while this thread captures.
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            for args in sets:
                fn(*args)
        replay = graph.replay
    except Exception as e:  # a peer that cannot be captured is still timed, launches included
        torch.cuda.synchronize()
        note = f"no CUDA graph ({type(e).__name__}): eager launches"

        def replay() -> None:
            for args in sets:
                fn(*args)
    refresh = refresh or (lambda: None)
    refresh()
    replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    refresh()
    start.record()
    replay()
    end.record()
    end.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(_reps(start.elapsed_time(end) / 1e3))]
    for a, b in events:
        refresh()
        a.record()
        replay()
        b.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(a.elapsed_time(b) for a, b in events) * 1e3 / len(sets), note


def time_jax(op: Callable, sets: Sequence[tuple], weight, case: Case) -> Tuple[float, str]:
    """Median µs per call of op over K = min(sets, JAX_SETS) input sets, looped on the GPU.

    op(*set, weight) returns the next set: a forward's (out, new residual), or out alone for a set
    (x, None); the backward's op returns its set with the gradients in it (bridge.bench.backward).

    The loop runs op on all K sets rotated by one, then on those results rotated back, into the
    carry: each call consumes an earlier call's output, so XLA can neither hoist nor drop one, a
    buffer written in place (the residual) ends in the carry slot it came from, and no slice of
    a stacked array (which XLA would copy before a Pallas call) is needed. The
    carry is donated and fed back; one dispatch covers ~JAX_CALL_S of GPU work. Should XLA keep
    a copy in the loop (extra bytes), the unrolled scheme (time_jax_unrolled) is used instead.
    """
    import jax

    compiled, carry, calls = compile_jax_loop(op, sets, weight, case)
    copies = len(array_copies(compiled.as_text()))
    if copies:
        us, note = time_jax_unrolled(op, sets, weight)
        return us, f"unrolled: XLA kept {copies} array copies in the loop; {note}".rstrip("; ")
    t0 = time.perf_counter()
    carry = jax.block_until_ready(compiled(carry, weight))  # warm-up
    warm_s = time.perf_counter() - t0
    if warm_s > 10 * JAX_CALL_S:  # far slower than guessed: one timed call (never the warm-up,
        t0 = time.perf_counter()  # whose first run of a big case can include allocations)
        carry = jax.block_until_ready(compiled(carry, weight))
        return (time.perf_counter() - t0) / calls * 1e6, "one sample"
    samples = []
    for _ in range(MIN_REPS):
        t0 = time.perf_counter()
        carry = jax.block_until_ready(compiled(carry, weight))
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples) * 1e6, ""


def compile_jax_loop(op: Callable, sets: Sequence[tuple], weight, case: Case) -> Tuple[object, list, int]:
    """time_jax's loop, compiled: (the executable, its carry (copies of the first K sets), op calls per run)."""
    import jax
    import jax.numpy as jnp

    k = min(len(sets), JAX_SETS)
    guess_s = 2e-6 + case.bytes_moved / 2.5e12  # sizes the loop only
    iterations = max(1, math.ceil(JAX_CALL_S / (2 * k * guess_s)))
    barrier = jax.lax.optimization_barrier

    def as_set(result) -> tuple:  # a forward without a residual returns out alone; its set is (x, None)
        return tuple(result) if isinstance(result, (tuple, list)) else (result, None)

    def loop(carry, w):
        def body(_, sets_in):
            # The barriers keep XLA from fusing two norms into one pass, and order every first-pass
            # call before any second-pass write, so the carry's buffers can be reused in place.
            mid = barrier([as_set(op(*sets_in[(i + 1) % k], w)) for i in range(k)])
            return [barrier(as_set(op(*mid[(i - 1) % k], w))) for i in range(k)]
        return jax.lax.fori_loop(0, iterations, body, carry)

    carry = jax.tree.map(jnp.copy, [tuple(s) for s in sets[:k]])
    return jax.jit(loop, donate_argnums=0).lower(carry, weight).compile(), carry, iterations * 2 * k


# A copy of a non-scalar array in optimized HLO text, e.g. "%copy.3 = bf16[256,4096]{1,0} copy(%p)",
# a tuple's, or an asynchronous copy's start.
_ARRAY_COPY = re.compile(r"= \(?\w+\[[^\]]+\][^=]*? copy(?:-start)?\(")


def array_copies(hlo_text: str) -> list:
    """The lines of optimized HLO text that copy an array: extra bytes XLA added around our calls
    (the bench's loop, the probes and the GPU tests of in-place calls all count these)."""
    return [line.strip() for line in hlo_text.splitlines() if _ARRAY_COPY.search(line)]


def time_jax_unrolled(op: Callable, sets: Sequence[tuple], weight) -> Tuple[float, str]:
    """Median µs per call of a jitted function that runs op on K separate input sets (no loop).

    Every output is returned, so nothing is dropped and nothing extra is read; calls cycle over
    groups of K sets, dispatched back to back. At small shapes dispatch can outlast the GPU work:
    such a time is noted as host-bound, an upper bound.
    """
    import jax

    k = min(len(sets), JAX_SETS)
    groups = [tuple(sets[i:i + k]) for i in range(0, len(sets) - k + 1, k)]
    many = jax.jit(lambda calls, w: [op(*args, w) for args in calls])
    jax.block_until_ready(many(groups[0], weight))
    t0 = time.perf_counter()
    jax.block_until_ready(many(groups[-1], weight))
    calls = max(2, _reps(time.perf_counter() - t0) // MIN_REPS)
    samples, dispatch_share = [], []
    for _ in range(MIN_REPS):
        t0 = time.perf_counter()
        for i in range(calls):
            result = many(groups[i % len(groups)], weight)
        dispatched = time.perf_counter()
        jax.block_until_ready(result)
        elapsed = time.perf_counter() - t0
        samples.append(elapsed / (calls * k))
        dispatch_share.append((dispatched - t0) / elapsed)
    host_bound = statistics.median(dispatch_share) > 0.9
    return statistics.median(samples) * 1e6, "host-bound: an upper bound" if host_bound else ""


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 on numpy arrays; inf when either is not finite."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.inf
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_close(case: Case, got, want, to_numpy: Callable) -> None:
    """Raise unless each output (out, and the new residual) is within CHECK_TOL of ours."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    if len(got) != len(want):
        raise ValueError(f"returned {len(got)} outputs, expected {len(want)}")
    for name, g, w in zip(("out", "new residual"), got, want):
        err = rel_err(to_numpy(g[:CHECK_ROWS]), to_numpy(w[:CHECK_ROWS]))
        if not err <= CHECK_TOL[case.dtype]:
            raise ValueError(f"{name} differs from ours: relative error {err:.2e} > {CHECK_TOL[case.dtype]:.0e}")


def torch_sets(n_sets: int, shape: Tuple[int, ...], dtype, g, device: str = "cuda") -> list:
    """n_sets random tensors, views of one allocation, each starting on a 256-byte boundary: Triton
    specializes kernels on pointer alignment, and a compile cannot happen inside a graph capture."""
    import torch

    numel = math.prod(shape)
    per_set = -(-numel * dtype.itemsize // 256) * 256 // dtype.itemsize
    pool = torch.empty((n_sets, per_set), dtype=dtype, device=device)
    if dtype.is_floating_point:
        pool.normal_(generator=g)
    else:
        pool.random_(generator=g)
    return [pool[i, :numel].view(shape) for i in range(n_sets)]


def torch_case_inputs(case: Case, n_sets: int, gradients: bool = False) -> tuple:
    """A case's rotated inputs on the GPU, seeded by its shape: (xs, rs[, gs, grs], weight), rs (and
    grs) None per set without a residual, gs and grs the output gradients when asked, the weight
    1 + 0.1 N(0, 1); drawn in that order, so every pass of a case sees the same x."""
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[case.dtype]
    g = torch.Generator(device="cuda").manual_seed(case.tokens * 7919 + case.hidden)
    shape = (case.tokens, case.hidden)
    pair = lambda: (torch_sets(n_sets, shape, dtype, g),  # noqa: E731
                    torch_sets(n_sets, shape, dtype, g) if case.residual else [None] * n_sets)
    drawn = pair() + (pair() if gradients else ())
    weight = (1 + 0.1 * torch.randn(case.hidden, generator=g, device="cuda")).to(dtype)
    return (*drawn, weight)


def jax_case_inputs(case: Case, n_sets: int) -> tuple:
    """A case's rotated JAX inputs, seeded by its shape: ([(x, residual or None)] per set, weight)."""
    import jax
    import jax.numpy as jnp

    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[case.dtype]
    normal = jax.jit(lambda key: jax.random.normal(key, (case.tokens, case.hidden), dtype))
    keys = jax.random.split(jax.random.key(case.tokens * 7919 + case.hidden), 2 * n_sets + 1)
    weight = (1 + 0.1 * jax.random.normal(keys[-1], (case.hidden,), jnp.float32)).astype(dtype)
    return [(normal(keys[2 * i]), normal(keys[2 * i + 1]) if case.residual else None) for i in range(n_sets)], weight


def time_copy(candidates: Dict[str, Callable], copies: Sequence[tuple]) -> Tuple[float, str]:
    """The fastest of the copy candidates (dst.copy_(src), a Triton copy), named in the note."""
    times = {how: time_torch(fn, copies)[0] for how, fn in candidates.items()}
    best = min(times, key=times.get)
    return times[best], f"{best} ({', '.join(f'{how} {us:.2f} µs' for how, us in times.items())})"


def copy_timing(case: Case, n_sets: int, sm_copy: Optional[Callable],
                unavailable: Dict[str, str]) -> Optional[Timing]:
    """The ceiling: copies moving the case's bytes, half read and half written, over as many sets."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(case.tokens * 7919 + case.hidden + 1)  # any bits do
    words = (-(-case.bytes_moved // 8),)  # half the bytes, in 4-byte words
    copies = list(zip(torch_sets(n_sets, words, torch.int32, g), torch_sets(n_sets, words, torch.int32, g)))
    candidates = {"memcpy": lambda s, d: d.copy_(s)}
    if sm_copy is not None:
        candidates["triton copy"] = sm_copy
    return run_impl(case, "copy", lambda: candidates, lambda fns: None, lambda fns: time_copy(fns, copies),
                    unavailable)


def run_impl(case: Case, name: str, make: Callable, check: Callable, timer: Callable,
             unavailable: Dict[str, str]) -> Optional[Timing]:
    """Build, check and time one impl; a failure becomes a skipped row with the reason, never a crash."""
    if name in unavailable:
        return None
    started = time.perf_counter()
    try:
        fn = make()
        check(fn)
        us, note = timer(fn)
        return Timing(case, name, us, note, time.perf_counter() - started)
    except Skip as e:
        unavailable[name] = str(e)
        print(f"  {name}: skipped for every {case.phase} case: {e}", flush=True)
        return None
    except Exception as e:  # one impl's failure must not end the run
        why = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        print(f"  {name} at {case.shape} {case.dtype}{' +res' if case.residual else ''} {case.phase}: {why}",
              flush=True)
        return Timing(case, name, None, why, time.perf_counter() - started)

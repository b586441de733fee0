"""`bi-norm bench`'s measuring loop (GPU only): every case's torch and JAX implementations built,
checked and timed, a failure noted rather than fatal; the forward's here, the backward's and
fwd+bwd's in bridge.bench.backward, the FP8 passes' in bridge.bench.fp8. It hands its results to
a checkpoint callback and never imports the report.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import backward, fp8
from .plan import (EPS, FP8_PASSES, IMPL_BY_NAME, IMPLS, LIGER_SITE, PASSES, Case, Determinism, Plan, Timing,
                   rotation_sets, runs_in)
from .timing import check_close, copy_timing, jax_case_inputs, run_impl, time_jax, time_torch, torch_case_inputs


def _no_gpu_reason() -> Optional[str]:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "torch sees no CUDA device"


def measure(plan: Plan, checkpoint: Callable[[List[Timing], List[Determinism]], None]
            ) -> Tuple[List[Timing], List[Determinism], str]:
    """Time every case; checkpoint(results so far) runs after each, so a cut-off run leaves its CSVs."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the GPU
    if LIGER_SITE.is_dir() and str(LIGER_SITE) not in sys.path:
        sys.path.append(str(LIGER_SITE))  # appended: the wheels there must not shadow the image's torch
    import torch

    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
    jax_why = _jax_unavailable()
    device = f"{torch.cuda.get_device_name(0)}, L2 {l2_bytes / 1e6:.0f} MB; {', '.join(package_versions())}"
    # Per pass: a peer skipped for every forward case (its package missing) is skipped for every backward
    # case too, by the same Skip, but a backward that cannot run leaves its forward alone.
    unavailable: Dict[str, Dict[str, str]] = {phase: {} for phase in PASSES}
    if jax_why:
        for skipped in unavailable.values():
            skipped.update({impl.name: jax_why for impl in IMPLS if impl.framework == "jax"})
    timings: List[Timing] = []
    determinism: List[Determinism] = []
    started = time.perf_counter()
    for i, case in enumerate(plan.cases, 1):
        n_sets = rotation_sets(case, l2_bytes)
        skipped = unavailable[case.phase]
        if case.phase in FP8_PASSES:
            case_timings = fp8.measure(case, n_sets, plan.peers, skipped, jax_why is None)
        elif case.phase != "forward":
            case_timings, case_determinism = backward.measure(case, n_sets, plan.peers, skipped, jax_why is None)
            determinism += case_determinism
        else:
            with torch.inference_mode():
                case_timings = _measure_torch(case, n_sets, plan.peers, skipped)
            torch.cuda.empty_cache()  # let JAX's allocator have the memory
            if not jax_why:
                case_timings += _measure_jax(case, n_sets, plan.peers, skipped)
        for name, why in skipped.items():
            if (name in ("bi-torch", "bi-jax") or name in plan.peers) and runs_in(name, case):
                case_timings.append(Timing(case, name, None, why))
        _flag_faster_than_copy(case_timings)
        timings += case_timings
        # Host seconds shown where they are large: compiles dominate the run's length.
        done = ", ".join(f"{t.impl} {t.us:.1f}" + (f" [{t.wall_s:.0f} s]" if t.wall_s >= 2 else "")
                         for t in case_timings if t.us is not None)
        print(f"[{i}/{len(plan.cases)} {time.perf_counter() - started:5.0f}s] {case.shape} {case.dtype}"
              f"{' +res' if case.residual else ''} {case.phase} ({n_sets} sets) µs: {done}", flush=True)
        checkpoint(timings, determinism)
    return timings, determinism, device


def package_versions() -> List[str]:
    """What a reader needs to reproduce a run: torch, triton, jax and Liger-Kernel, those installed."""
    found = []
    for dist, label in (("torch", "torch"), ("triton", "triton"), ("jax", "jax"), ("liger-kernel", "Liger-Kernel")):
        try:
            found.append(f"{label} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _flag_faster_than_copy(case_timings: List[Timing]) -> None:
    """Note times under 90% of the copy's: no RMSNorm moves its bytes faster than a copy does."""
    copy_us = next((t.us for t in case_timings if t.impl == "copy"), None)
    for t in case_timings:
        if copy_us and t.us and t.impl != "copy" and t.us < 0.9 * copy_us:
            t.note = "; ".join(filter(None, [t.note, "suspect: faster than the copy ceiling"]))


def _jax_unavailable() -> Optional[str]:
    try:
        import jax
    except ImportError:
        return "jax is not installed"
    return None if jax.default_backend() == "gpu" else "JAX sees no GPU"


def _peers_module(framework: str, peers: Sequence[str], unavailable: Dict[str, str]):
    """bridge.bench.peers, or None (its peers marked unavailable) when it fails to import."""
    try:
        from . import peers as bench_peers
    except Exception as e:  # triton broken, say: our kernels and the copy still run
        for name in peers:
            if IMPL_BY_NAME[name].framework == framework:
                unavailable.setdefault(name, f"bridge.bench.peers failed to import: {e}")
        return None
    return bench_peers


def _measure_torch(case: Case, n_sets: int, peers: Sequence[str], unavailable: Dict[str, str]) -> List[Timing]:
    import bi_torch

    bench_peers = _peers_module("torch", peers, unavailable)
    xs, rs, weight = torch_case_inputs(case, n_sets)
    sets = list(zip(xs, rs))

    def ours(x, r):
        return bi_torch.rms_norm(x, weight, EPS, r)

    want = []  # our output on the first set, once our kernel has run

    def check(fn):
        result = fn(*sets[0])
        if fn is ours:
            want.append(result)
        elif want:
            check_close(case, result, want[0], lambda t: t.float().cpu().numpy())

    timings = [run_impl(case, "bi-torch", lambda: ours, check, lambda fn: time_torch(fn, sets), unavailable)]
    for name in peers:
        if IMPL_BY_NAME[name].framework == "torch" and runs_in(name, case) and bench_peers is not None:
            make = bench_peers.TORCH_PEERS[name]
            timings.append(run_impl(case, name, lambda: make(weight, EPS, case.residual), check,
                                     lambda fn: time_torch(fn, sets), unavailable))
    _note_unchecked(timings, want, "bi-torch")
    del xs, rs, sets, want
    timings.append(copy_timing(case, n_sets, bench_peers and bench_peers.sm_copy, unavailable))
    return [t for t in timings if t is not None]


def _measure_jax(case: Case, n_sets: int, peers: Sequence[str], unavailable: Dict[str, str]) -> List[Timing]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bi_jax

    bench_peers = _peers_module("jax", peers, unavailable)
    sets, weight = jax_case_inputs(case, n_sets)

    def ours(x, r, w):
        return bi_jax.rms_norm(x, w, EPS, r)

    want = []  # our output on the first set, once our kernel has run

    def check(op):
        result = jax.jit(op)(*sets[0], weight)
        if op is ours:
            want.append(result)
        elif want:
            check_close(case, result, want[0], lambda a: np.asarray(a.astype(jnp.float32)))

    timings = [run_impl(case, "bi-jax", lambda: ours, check, lambda op: time_jax(op, sets, weight, case),
                         unavailable)]
    for name in peers:
        if IMPL_BY_NAME[name].framework == "jax" and runs_in(name, case) and bench_peers is not None:
            make = bench_peers.JAX_PEERS[name]
            timings.append(run_impl(case, name, lambda: make(EPS, case.residual), check,
                                     lambda op: time_jax(op, sets, weight, case), unavailable))
    _note_unchecked(timings, want, "bi-jax")
    return [t for t in timings if t is not None]


def _note_unchecked(timings: List[Optional[Timing]], want: list, ours: str) -> None:
    """Where our kernel failed, the peers' outputs had nothing to be checked against: say so."""
    for t in timings:
        if not want and t is not None and t.impl != ours and t.us is not None:
            t.note = "; ".join(filter(None, [t.note, f"unchecked: {ours} failed"]))

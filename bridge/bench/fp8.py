"""`bi-norm bench`'s FP8 cases (GPU only; the checks and the loop's glue run anywhere): the FP8
output (contract v1.2, float8_e4m3fn) with a static scale (fp8-static) or per-token-group scales
(fp8-group), ours and the peers (bridge.bench.fp8_peers) built, checked against
bridge.reference and timed; a failure noted rather than fatal.

The check runs on the first input set at the timed shape, on its first check_rows(case) rows
(a row's bits depend on that row alone): ours bit for bit (out's FP8 codes, the scales, the new
residual), a peer within FP8_ULPS steps of the reference's codes (it rounds differently: rsqrt,
D-rounded products), its scales and new residual within CHECK_TOL; how many codes differ goes
into the note. torch is timed as the forward (a CUDA graph over the rotated sets); JAX with a
residual through time_jax's loop, its sets carrying the outputs (fp8_loop_op), without one by
unrolled calls (time_jax_fp8).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .plan import (CHECK_TOL, EPS, FP8_FORMAT, FP8_GROUP_SIZE, FP8_SCALE, FP8_ULPS, IMPL_BY_NAME, PEER_NAMES, Case,
                   Timing, check_rows, runs_in)
from .timing import (copy_timing, jax_case_inputs, rel_err, run_impl, time_jax, time_jax_unrolled, time_torch,
                     torch_case_inputs)

Parts = Tuple[object, Optional[object], Optional[object]]  # (out, scales or None, new residual or None)


def grouped(case: Case) -> bool:
    return case.phase == "fp8-group"


def quant_args(case: Case, scale) -> dict:
    """rms_norm's FP8 keywords besides out_dtype: the static scale (as the framework's array), or group_size."""
    return {"group_size": FP8_GROUP_SIZE} if grouped(case) else {"scale": scale}


def split(result, case: Case) -> Parts:
    """(out, scales, new residual) of what rms_norm returns for this case: static out or (out,
    new_residual); per group (out, scales) or (out, scales, new_residual)."""
    result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    out, rest = result[0], list(result[1:])
    scales = rest.pop(0) if grouped(case) else None
    return out, scales, rest.pop(0) if case.residual else None


def reference_parts(case: Case, x: np.ndarray, r: Optional[np.ndarray], weight: np.ndarray) -> Parts:
    from bridge.numerics import reference

    scale = None if grouped(case) else np.asarray(FP8_SCALE, np.float32)
    kw = quant_args(case, scale)
    return split(reference.rms_norm(x, weight, EPS, r, out_dtype=FP8_FORMAT, **kw), case)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def fp8_steps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|ordinal(got) - ordinal(want)| per element of two float8_e4m3fn arrays: 0 equal (or both
    NaN, or +0 / -0), 1 neighbours (across zero too); 255 where one only is NaN."""
    def ordinal(a):
        codes = _bits(a).astype(np.int16)
        magnitude = codes & 0x7F
        return np.where(codes & 0x80, -magnitude, magnitude), magnitude == 0x7F
    (g, g_nan), (w, w_nan) = ordinal(got), ordinal(want)
    return np.where(g_nan | w_nan, np.where(g_nan & w_nan, 0, 255), np.abs(g - w))


def check_fp8(case: Case, got: Parts, want: Parts, exact: bool) -> str:
    """Raise unless got (numpy, the check's rows) matches the reference's parts: exact, bit for
    bit; a peer, within FP8_ULPS steps and CHECK_TOL. Returns the note: how many codes differ."""
    names = ("out", "scales", "new residual")
    for name, g, w in zip(names, got, want):
        if (g is None) != (w is None) or (w is not None and g.shape != w.shape):
            raise ValueError(f"{name}: got {None if g is None else g.shape}, the reference "
                             f"{None if w is None else w.shape}")
    if exact:
        for name, g, w in zip(names, got, want):
            bad = 0 if w is None else int(np.count_nonzero(_bits(g) != _bits(w)))
            if bad:
                raise ValueError(f"{name} differs from the reference at {bad} of {w.size} elements (bit for bit)")
        return ""
    steps = fp8_steps(got[0], want[0])
    if steps.size and steps.max() > FP8_ULPS:
        raise ValueError(f"out differs from the reference by {steps.max()} FP8 steps at "
                         f"{np.count_nonzero(steps > FP8_ULPS)} of {steps.size} elements (at most {FP8_ULPS})")
    if got[1] is not None:
        err = float(np.max(np.abs(got[1].astype(np.float64) / want[1] - 1), initial=0.0))
        if not err <= CHECK_TOL[case.dtype]:
            raise ValueError(f"scales differ from the reference: relative error {err:.2e} > "
                             f"{CHECK_TOL[case.dtype]:.0e}")
    if got[2] is not None and not rel_err(got[2], want[2]) <= CHECK_TOL[case.dtype]:
        raise ValueError(f"new residual differs from the reference: relative error {rel_err(got[2], want[2]):.2e}")
    differ = int(np.count_nonzero(steps))
    return f"FP8 codes: {differ} of {steps.size} one step from the reference's" if differ else ""


def fp8_loop_op(op: Callable, case: Case) -> Callable:
    """op(x, r, w), returning rms_norm's FP8 tuple, as time_jax's op over sets (x, r, out, earlier out)
    (per group also (scales, earlier scales)), for a case with a residual: it returns (x, new residual,
    its out, the set's out[, its scales, the set's scales]). The next call reads the new residual, so
    no call can be hoisted or merged with another, and every call's outputs reach the loop's carry, a
    call later: XLA prunes an optimization barrier's unused outputs, so an out that no later call
    passed on would be dead code (the first pass over the sets dropped)."""
    def loop(x, r, out, _, *rest):
        new_out, scales, new_residual = split(op(x, r, rest[-1]), case)
        return (x, new_residual, new_out, out, scales, rest[0]) if grouped(case) else (x, new_residual, new_out, out)
    return loop


def time_jax_fp8(op: Callable, sets: Sequence[tuple], weight, case: Case) -> Tuple[float, str]:
    """With a residual time_jax's loop (fp8_loop_op); without one no output is in x's dtype, so no
    call can feed the next and a loop's calls (all on the same x) would be hoisted or merged: the
    unrolled calls over separate sets (time_jax_unrolled), every output returned."""
    import jax.numpy as jnp

    if not case.residual:
        us, note = time_jax_unrolled(op, sets, weight)
        return us, "; ".join(filter(None, ["unrolled: no output in x's dtype to chain calls", note]))
    outs = [jnp.zeros((case.tokens, case.hidden), jnp.float8_e4m3fn)] * 2  # time_jax copies them into its carry
    if grouped(case):
        outs += [jnp.zeros((case.tokens, case.hidden // FP8_GROUP_SIZE), jnp.float32)] * 2
    return time_jax(fp8_loop_op(op, case), [(x, r, *outs) for x, r in sets], weight, case)


def measure(case: Case, n_sets: int, peers: Sequence[str], unavailable: Dict[str, str],
            with_jax: bool) -> List[Timing]:
    """The FP8 case's timings: torch (ours, the torch peers, the copy), then JAX."""
    import torch

    with torch.inference_mode():
        timings = _measure_torch(case, n_sets, peers, unavailable)
    torch.cuda.empty_cache()  # let JAX's allocator have the memory
    return timings + (_measure_jax(case, n_sets, peers, unavailable) if with_jax else [])


def _names(ours: str, framework: str, peers: Sequence[str], case: Case) -> List[str]:
    """Ours, then the peers in IMPLS order (vllm-fp8, which updates residuals in place, last)."""
    return [ours] + [n for n in PEER_NAMES if n in peers and IMPL_BY_NAME[n].framework == framework
                     and runs_in(n, case)]


def _fp8_peers(framework: str, names: Sequence[str], unavailable: Dict[str, str]):
    """bridge.bench.fp8_peers, or None (its peers marked unavailable) when it fails to import."""
    try:
        from . import fp8_peers
    except Exception as e:  # triton broken, say: our kernels and the copy still run
        for name in names[1:]:
            unavailable.setdefault(name, f"bridge.bench.fp8_peers failed to import: {e}")
        return None
    return fp8_peers


def _check_and_time(case: Case, names: Sequence[str], factory: Callable[[str], Callable], run_first: Callable,
                    to_numpy: Callable, want: Parts, timer: Callable, unavailable: Dict[str, str]) -> List[Timing]:
    """run_impl for each name: factory(name)() builds it, run_first(fn) is its result on the first set,
    the check's note goes before the timer's."""
    rows = want[0].shape[0]
    notes: Dict[str, str] = {}
    timings = []
    for name in names:
        def check(fn, name=name) -> None:
            got = tuple(None if a is None else to_numpy(a[:rows]) for a in split(run_first(fn), case))
            notes[name] = check_fp8(case, got, want, exact=IMPL_BY_NAME[name].kind == "ours")

        def timed(fn, name=name) -> Tuple[float, str]:
            us, note = timer(fn)
            return us, "; ".join(filter(None, [notes.get(name, ""), note]))

        timings.append(run_impl(case, name, factory(name), check, timed, unavailable))
    return [t for t in timings if t is not None]


def _measure_torch(case: Case, n_sets: int, peers: Sequence[str], unavailable: Dict[str, str]) -> List[Timing]:
    import torch

    import bi_torch
    from bi_torch import to_numpy

    names = _names("bi-torch", "torch", peers, case)
    module = _fp8_peers("torch", names, unavailable)
    xs, rs, weight = torch_case_inputs(case, n_sets)
    rows = check_rows(case)
    want = reference_parts(case, to_numpy(xs[0][:rows]), None if rs[0] is None else to_numpy(rs[0][:rows]),
                           to_numpy(weight))
    scale = torch.tensor(FP8_SCALE, dtype=torch.float32, device="cuda")
    kw = quant_args(case, scale)
    sets = list(zip(xs, rs))

    def factory(name: str) -> Callable:
        if name == "bi-torch":
            return lambda: lambda x, r: bi_torch.rms_norm(x, weight, EPS, r, out_dtype=torch.float8_e4m3fn, **kw)
        return lambda: module.TORCH_FP8[name](weight, EPS, case.residual, kw.get("scale"), kw.get("group_size"))

    names = names if module is not None else names[:1]
    timings = _check_and_time(case, names, factory, lambda fn: fn(*sets[0]), to_numpy, want,
                              lambda fn: time_torch(fn, sets), unavailable)
    del xs, rs, sets
    copy = copy_timing(case, n_sets, module and module.sm_copy, unavailable)
    return timings + ([copy] if copy is not None else [])


def _measure_jax(case: Case, n_sets: int, peers: Sequence[str], unavailable: Dict[str, str]) -> List[Timing]:
    import jax
    import jax.numpy as jnp

    import bi_jax

    names = _names("bi-jax", "jax", peers, case)
    module = _fp8_peers("jax", names, unavailable)
    sets, weight = jax_case_inputs(case, n_sets)
    rows = check_rows(case)
    x0, r0 = sets[0]
    want = reference_parts(case, np.asarray(x0[:rows]), None if r0 is None else np.asarray(r0[:rows]),
                           np.asarray(weight))
    kw = quant_args(case, jnp.asarray(FP8_SCALE, jnp.float32))

    def factory(name: str) -> Callable:
        if name == "bi-jax":
            return lambda: lambda x, r, w: bi_jax.rms_norm(x, w, EPS, r, out_dtype=jnp.float8_e4m3fn, **kw)
        return lambda: module.JAX_FP8[name](EPS, case.residual, kw.get("scale"), kw.get("group_size"))

    names = names if module is not None else names[:1]
    return _check_and_time(case, names, factory, lambda op: jax.jit(op)(x0, r0, weight), np.asarray, want,
                           lambda op: time_jax_fp8(op, sets, weight, case), unavailable)

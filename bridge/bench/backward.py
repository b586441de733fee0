"""`bi-norm bench`'s backward and fwd+bwd cases (GPU only): every implementation built, checked
against bridge.reference and timed, its grad_weight's run-to-run determinism counted at
DETERMINISM_SHAPES; a failure noted rather than fatal.

Inputs per set: x (and a residual), grad_out (and the new residual's gradient). The check runs
on the first set with both gradients zero past its first rows: those rows' gradients, grad_weight
included, are then the reference's on those rows alone (a zero output gradient adds nothing), at
the timed shape, so through the same kernels. torch times fn(i, grad_out, grad_new_residual) over
the sets in a CUDA graph captured on the stream its forwards ran on (autograd runs a backward
there). JAX carries (z, g[, gr], grad_weight) through time_jax's loop (loop_op): every input of a
call is an output of the call before, so no call, and no part of one, can be hoisted or dropped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .plan import (CHECK_TOL, DETERMINISM_RUNS, EPS, IMPL_BY_NAME, Case, Determinism, Timing, check_rows,
                   checks_determinism, runs_in)
from .timing import copy_timing, rel_err, run_impl, time_jax, time_torch, torch_case_inputs

Results = Tuple[List[Timing], List[Determinism]]


def measure(case: Case, n_sets: int, peers: Sequence[str], unavailable: Dict[str, str], with_jax: bool) -> Results:
    """The backward or fwd+bwd case's timings (torch, then JAX for the backward) and determinism counts."""
    import torch

    timings, determinism = _measure_torch(case, n_sets, peers, unavailable)
    torch.cuda.empty_cache()  # let JAX's allocator have the memory
    if with_jax and case.phase == "backward":
        jax_timings, jax_determinism = _measure_jax(case, n_sets, peers, unavailable)
        timings, determinism = timings + jax_timings, determinism + jax_determinism
    return timings, determinism


def check_grads(case: Case, got: tuple, want: tuple, rows: int, to_numpy: Callable) -> None:
    """Raise unless grad_x (and grad_residual) on the first rows and grad_weight are within CHECK_TOL of
    the reference's. got: (grad_x, grad_residual or None for grad_x's tensor, grad_weight)."""
    grad_x, grad_residual, grad_weight = got
    names = ("grad_x", "grad_residual", "grad_weight") if case.residual else ("grad_x", "grad_weight")
    grad_residual = grad_x if grad_residual is None else grad_residual
    mine = (grad_x[:rows], grad_residual[:rows], grad_weight) if case.residual else (grad_x[:rows], grad_weight)
    for name, g, w in zip(names, mine, want):
        err = rel_err(to_numpy(g), w)
        if not err <= CHECK_TOL[case.dtype]:
            raise ValueError(f"{name} differs from the reference: relative error {err:.2e} > "
                             f"{CHECK_TOL[case.dtype]:.0e}")


def count_patterns(case: Case, name: str, run: Callable[[], bytes]) -> Determinism:
    """Distinct results of DETERMINISM_RUNS calls of run (grad_weight's bytes); an error is noted."""
    try:
        return Determinism(case, name, DETERMINISM_RUNS, len({run() for _ in range(DETERMINISM_RUNS)}))
    except Exception as e:  # the timing stands; only the count is lost
        return Determinism(case, name, DETERMINISM_RUNS, None, f"error: {type(e).__name__}: {e}"[:200])


def _reference(x, r, g, gr, weight) -> tuple:
    """bridge.reference's gradients (numpy arrays of the case's dtype, the check's rows only)."""
    from bridge.numerics import reference

    return reference.rms_norm_backward(x, weight, g, EPS, r, gr)


def _backward_peers(framework: str, names: Sequence[str], unavailable: Dict[str, str]):
    """bridge.bench.backward_peers, or None (its implementations marked unavailable) when it fails to import."""
    try:
        from . import backward_peers
    except Exception as e:  # triton broken, say: the copy still runs
        for name in names:
            if IMPL_BY_NAME[name].framework == framework:
                unavailable.setdefault(name, f"bridge.bench.backward_peers failed to import: {e}")
        return None
    return backward_peers


def _measure_torch(case: Case, n_sets: int, peers: Sequence[str], unavailable: Dict[str, str]) -> Results:
    from bi_torch import to_numpy

    names = [n for n in ("bi-torch", *peers) if IMPL_BY_NAME[n].framework == "torch" and runs_in(n, case)]
    module = _backward_peers("torch", names, unavailable)
    xs, rs, gs, grs, weight = torch_case_inputs(case, n_sets, gradients=True)
    timings: List[Optional[Timing]] = []
    determinism: List[Determinism] = []
    if module is not None:
        rows = check_rows(case)
        host = [None if t is None else to_numpy(t[:rows]) for t in (xs[0], rs[0], gs[0], grs[0])]
        inputs = _TorchInputs(xs, rs, gs, grs, weight, rows, _reference(*host, to_numpy(weight)))
        factories = module.TORCH_BACKWARD if case.phase == "backward" else module.TORCH_FWD_BWD
        for name in names:
            timings.append(_time_torch_impl(case, name, factories[name], inputs, unavailable, determinism))
        del inputs
    del xs, rs, gs, grs
    timings.append(copy_timing(case, n_sets, module and module.sm_copy, unavailable))
    return [t for t in timings if t is not None], determinism


@dataclasses.dataclass
class _TorchInputs:
    xs: list
    rs: list
    gs: list  # grad_out per set
    grs: list  # the new residual's gradient per set (None without a residual)
    weight: object
    rows: int  # the check's rows
    want: tuple  # the reference's gradients on them


def _time_torch_impl(case: Case, name: str, factory: Callable, inputs: _TorchInputs, unavailable: Dict[str, str],
                     determinism: List[Determinism]) -> Optional[Timing]:
    import torch

    from bi_torch import to_numpy

    stream = torch.cuda.Stream()  # the forwards' and so the backwards' stream, where time_torch captures
    own: List[torch.Tensor] = []  # an overwriting impl's own copies of grad_out, refreshed before each replay
    gs, grs, rows = inputs.gs, inputs.grs, inputs.rows

    def make():
        with torch.cuda.stream(stream):
            made = factory(inputs.weight, EPS, case.residual, inputs.xs, inputs.rs)
        torch.cuda.synchronize()
        if made.overwrites_grad_out:
            own.extend(t.clone() for t in gs)
        return made

    def check(made) -> None:
        # The first set with both gradients zero past the check's rows.
        g, gr = (None if t is None else torch.cat([t[:rows], torch.zeros_like(t[rows:])]) for t in (gs[0], grs[0]))
        check_grads(case, made.fn(0, g, gr), inputs.want, rows, lambda t: t.float().cpu().numpy())

    def timer(made) -> Tuple[float, str]:
        refresh = (lambda: torch._foreach_copy_(own, gs)) if own else None
        us, note = time_torch(made.fn, list(zip(range(len(gs)), own or gs, grs)), stream=stream, refresh=refresh)
        if checks_determinism(case):
            def once() -> bytes:
                if own:
                    own[0].copy_(gs[0])
                return to_numpy(made.fn(0, own[0] if own else gs[0], grs[0])[2]).tobytes()
            determinism.append(count_patterns(case, name, once))
        return us, "; ".join(filter(None, ["fresh grad_out each call, copied outside the timed events" if own else "",
                                           note]))

    return run_impl(case, name, make, check, timer, unavailable)


def _measure_jax(case: Case, n_sets: int, peers: Sequence[str], unavailable: Dict[str, str]) -> Results:
    import jax
    import jax.numpy as jnp
    import numpy as np

    names = [n for n in ("bi-jax", *peers) if IMPL_BY_NAME[n].framework == "jax" and runs_in(n, case)]
    module = _backward_peers("jax", names, unavailable)
    if module is None:
        return [], []
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[case.dtype]
    normal = jax.jit(lambda key: jax.random.normal(key, (case.tokens, case.hidden), dtype))
    keys = jax.random.split(jax.random.key(case.tokens * 7919 + case.hidden), 3 * n_sets + 1)
    weight = (1 + 0.1 * jax.random.normal(keys[-1], (case.hidden,), jnp.float32)).astype(dtype)
    # z is drawn directly (what the forward normalised); the reference gets it as x + 0 or 0 + residual.
    zs = [normal(keys[3 * i]) for i in range(n_sets)]
    gs = [normal(keys[3 * i + 1]) for i in range(n_sets)]
    grs = [normal(keys[3 * i + 2]) if case.residual else None for i in range(n_sets)]
    sets = [(z, g, *([gr] if case.residual else []), weight) for z, g, gr in zip(zs, gs, grs)]
    rows = check_rows(case)
    check_g, check_gr = (None if a is None else a.at[rows:].set(0) for a in (gs[0], grs[0]))
    z0 = np.asarray(zs[0][:rows])
    x0, r0 = (np.zeros_like(z0), z0) if case.residual else (z0, None)
    want = _reference(x0, r0, np.asarray(gs[0][:rows]), None if grs[0] is None else np.asarray(grs[0][:rows]),
                      np.asarray(weight))

    def check(grads) -> None:
        result = jax.jit(grads)(zs[0], check_g, check_gr, weight)
        check_grads(case, result, want, rows, lambda a: np.asarray(a.astype(jnp.float32)))

    def timer(grads, name: str) -> Tuple[float, str]:
        result = time_jax(loop_op(grads, case.residual), sets, weight, case)
        if checks_determinism(case):
            call = jax.jit(grads)
            determinism.append(count_patterns(
                case, name, lambda: np.asarray(call(zs[0], gs[0], grs[0], weight)[2]).tobytes()))
        return result

    timings, determinism = [], []
    for name in names:
        make = module.JAX_BACKWARD[name]
        timings.append(run_impl(case, name, functools.partial(make, EPS, case.residual), check,
                                functools.partial(timer, name=name), unavailable))
    return [t for t in timings if t is not None], determinism


def loop_op(grads: Callable, residual: bool) -> Callable:
    """grads as time_jax's op: (z, g[, gr], gw, w) -> the next set. Every input of a call is an
    output of the one before (z <- grad_x, g <- z, gr <- grad_residual, and the previous call's
    grad_weight is this call's weight), so XLA can neither drop a grad_weight nobody reads nor share
    one row norm between two calls on the same z. No value is read after a call wrote over it:
    bi-jax writes grad_x over g and grad_residual over gr (input_output_aliases), and z, which it
    only reads, becomes the next g, so XLA needs no copy to keep one (z <- g made it copy g each
    call, and the bench fell back to unrolled calls, copies included). Buffers return to their
    slots every two calls, the loop body's two passes. The values drift; the GPU's speed does not
    depend on them, and the check runs apart from the loop."""
    def op(z, g, *rest):
        gr = rest[0] if residual else None
        grad_x, grad_residual, grad_weight = grads(z, g, gr, rest[-2])
        if not residual:
            return grad_x, z, grad_weight
        # An implementation that gives grad_x as the residual's gradient too keeps gr for the next call.
        return grad_x, z, gr if grad_residual is None else grad_residual, grad_weight
    return op

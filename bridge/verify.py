"""`bi-norm verify`: the golden corpus and a batch-invariance sweep through every backend.

Three passes per backend: the forward (v1), the backward (v1.1) and the FP8 output (v1.2); then
the cross-framework row, bi_torch against bi_jax on the same memory, for the same three.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

from . import crossframework, crossframework_backward, crossframework_device, crossframework_fp8
from . import golden, golden_backward, subnormals
from .backends import BACKENDS, Backend
from .compare import first_mismatch
from .verify_report import BackendReport, PassReport, Progress, Ticker, Unavailable, overall_status, run_pass

QUICK_MAX_N = 1025
INVARIANCE_SIZES = (7, 128, 1000, 4096, 65536)
INVARIANCE_BATCHES = (1, 2, 5, 33)
QUICK_INVARIANCE_BATCHES = (1, 5)
# The backward's sweep is shorter: grad_x rows of the backward corpus's cases at these n.
BACKWARD_INVARIANCE_SIZES = (128, 4096)
BACKWARD_INVARIANCE_BATCHES = (1, 5, 33)
# FP8: a row alone vs in batches of 255 and 300 rows (vLLM's test_rms_norm_batch_invariant.py uses
# these), for a static and a per-group case of each dtype with n <= FP8_INVARIANCE_MAX_N.
FP8_INVARIANCE_BATCHES = (255, 300)
FP8_INVARIANCE_MAX_N = 128
# The cross-framework row: bi_torch's result handed to JAX zero-copy and compared there.
CROSS_FRAMEWORK = "torch-jax-dlpack"
# On CPU both kernels run in interpreters: the cross check keeps to short rows there.
CROSS_CPU_MAX_N = 129
BACKEND_BY_NAME = {b.name: b for b in BACKENDS}


@dataclasses.dataclass
class Plan:
    """What one backend runs: corpus cases, invariance cases and batch sizes, for each pass."""

    cases: list
    invariance_cases: list
    batches: Sequence[int]
    backward_cases: list
    backward_invariance_cases: list
    backward_batches: Sequence[int]
    fp8_cases: list = dataclasses.field(default_factory=list)
    fp8_invariance_cases: list = dataclasses.field(default_factory=list)
    fp8_batches: Sequence[int] = FP8_INVARIANCE_BATCHES

    def forward_steps(self) -> int:
        return len(self.cases) + len(self.invariance_cases)

    def backward_steps(self) -> int:
        return len(self.backward_cases) + len(self.backward_invariance_cases)

    def steps(self) -> int:
        return self.forward_steps() + self.backward_steps() + len(self.fp8_cases) + len(self.fp8_invariance_cases)


def _select_cases(cases: Sequence, dtypes: Optional[Sequence[str]], quick: bool) -> list:
    return [c for c in cases if (not dtypes or c.spec.dtype in dtypes) and (not quick or c.spec.n <= QUICK_MAX_N)]


def _outputs(result, has_residual: bool):
    return result if has_residual else (result, None)


def _check_corpus(run, cases, report: PassReport, tick: Ticker) -> None:
    for case in cases:
        report.cases += 1
        for (mode, offset), expected in case.out.items():
            out, new_res = _outputs(run(case.x, case.weight, case.spec.eps, case.residual, mode, offset),
                                    case.residual is not None)
            where = f"{case.spec.name} {mode}/{offset:g}"
            report.note(f"{where} out", first_mismatch(expected, out))
            if case.residual is not None:
                report.note(f"{where} new_residual", first_mismatch(case.new_residual, new_res))
        tick()


def _check_backward_corpus(run, cases, report: PassReport, tick: Ticker, flushes_subnormals: bool) -> None:
    """With flushes_subnormals, the rows of grad_x (grad_residual) and the columns of grad_weight
    whose steps meet a float32 subnormal are left out of the comparison, and counted."""
    for case in cases:
        report.cases += 1
        names = golden_backward.output_names(case.residual is not None)
        for (mode, offset), expected in case.expected.items():
            got = run(case.x, case.weight, case.grad_out, case.spec.eps, case.residual, case.grad_new_residual,
                      mode, offset)
            if flushes_subnormals:
                rows, cols = subnormals.flushed(case.x, case.weight, case.grad_out, case.spec.eps, case.residual,
                                                case.grad_new_residual, mode, offset)
                report.flushed += int(rows.sum()) + int(cols.sum())
                got = subnormals.outside_flushed(expected, got, rows, cols)
            for what, exp, g in zip(names, expected, got):
                report.note(f"{case.spec.name} {mode}/{offset:g} {what}", first_mismatch(exp, g))
        tick()


def _check_fp8_corpus(run, cases, report: PassReport, tick: Ticker) -> None:
    """out, the scales (per group) and the new residual (with a residual) of every FP8 case."""
    for case in cases:
        report.cases += 1
        for mode, offset in case.spec.outputs:
            got = run(case.x, case.weight, case.spec.eps, case.residual, mode, offset, case.quantization())
            where = f"{case.spec.name} {mode}/{offset:g}"
            for what, exp, g in zip(("out", "scales", "new_residual"), case.expected(mode, offset), got):
                if exp is not None:
                    report.note(f"{where} {what}", first_mismatch(exp, g))
        tick()


def _neighbours(rng: np.random.Generator, like: np.ndarray, rows: int) -> np.ndarray:
    return (rng.standard_normal((rows, like.shape[-1])) * 4).astype(np.float32).astype(like.dtype)


def _in_batch(rng: np.random.Generator, rows: Sequence[Optional[np.ndarray]], batch: int):
    """(pos, arrays): each one-row array at row pos of `batch` random rows, in a 3-D leading shape
    (batch, 1, n) as a model's (batch, seq, hidden) activations have; None stays None."""
    pos = (batch * 5) // 7
    batched = []
    for row in rows:
        if row is not None:
            row, other = _neighbours(rng, row, batch), row
            row[pos] = other[0]
            row = row.reshape(batch, 1, -1)
        batched.append(row)
    return pos, batched


def _sweep(cases, batches, report: PassReport, tick: Ticker, names: Sequence[str], arrays, call) -> None:
    """Row 0 of each case alone vs inside batches: row 0 of each of arrays(case) (None: absent) goes
    into call(case, rows), which returns the arrays `names`, compared at the row's position."""
    rng = np.random.default_rng(0)
    for case in cases:
        rows = [None if a is None else a[:1] for a in arrays(case)]
        alone = call(case, rows)
        for batch in batches:
            pos, batched = _in_batch(rng, rows, batch)
            for what, exp, got in zip(names, alone, call(case, batched)):
                if exp is not None:
                    report.note(f"invariance {case.spec.name} batch {batch} row {pos} {what}",
                                first_mismatch(exp[0], got[pos, 0]), invariance=True)
        tick()


def run_backend(backend: Backend, plan: Plan, progress: Progress) -> BackendReport:
    report = BackendReport(backend.name, "ok")
    reason = backend.probe()
    if reason is not None:
        report.status, report.reason = "unavailable", reason
        return report
    tick = Ticker(backend.name, plan.steps(), progress)

    def forward(r: PassReport) -> None:
        run = backend.make_runner()
        _check_corpus(run, plan.cases, r, tick)
        _sweep(plan.invariance_cases, plan.batches, r, tick, ("out", "new_residual"), lambda c: (c.x, c.residual),
               lambda c, rows: _outputs(run(rows[0], c.weight, c.spec.eps, rows[1], *c.spec.outputs[0]),
                                        rows[1] is not None))

    def backward(r: PassReport) -> None:
        run = backend.make_backward_runner()
        _check_backward_corpus(run, plan.backward_cases, r, tick, backend.flushes_subnormals)
        # grad_x and grad_residual only: grad_weight sums every row of the batch.
        _sweep(plan.backward_invariance_cases, plan.backward_batches, r, tick, ("grad_x", "grad_residual"),
               lambda c: (c.x, c.grad_out, c.residual, c.grad_new_residual),
               lambda c, rows: run(rows[0], c.weight, rows[1], c.spec.eps, *rows[2:], *c.spec.outputs[0])[:-1])

    def fp8(r: PassReport) -> None:
        if backend.make_fp8_runner is None:
            raise Unavailable(f"{backend.name} has no FP8 runner")
        run = backend.make_fp8_runner()
        _check_fp8_corpus(run, plan.fp8_cases, r, tick)
        _sweep(plan.fp8_invariance_cases, plan.fp8_batches, r, tick, ("out", "scales", "new_residual"),
               lambda c: (c.x, c.residual),
               lambda c, rows: run(rows[0], c.weight, c.spec.eps, rows[1], *c.spec.outputs[0], c.quantization()))

    report.forward = run_pass(forward, backward=False)
    tick.reach(plan.forward_steps())
    report.backward = run_pass(backward, backward=True)
    tick.reach(plan.forward_steps() + plan.backward_steps())
    report.fp8 = run_pass(fp8, backward=False)
    tick.reach(plan.steps())
    report.status = overall_status(report)
    return report


def run_cross_framework(cases, backward_cases, progress: Progress, fp8_cases: Sequence = ()) -> BackendReport:
    """bi_torch and bi_jax on the same inputs, bits compared on the device through DLPack: the
    forward's corpus, the backward's (on a CPU, short rows, and the gradient cases whose steps
    meet no float32 subnormal: XLA:CPU flushes those in bi_jax's interpret mode) and the FP8 corpus
    (on a CPU, short rows)."""
    report = BackendReport(CROSS_FRAMEWORK, "ok")
    reason = crossframework_device.probe()
    if reason is not None:
        report.status, report.reason = "unavailable", reason
        return report
    device = crossframework_device.best_device()
    short = (lambda c: c.spec.n <= CROSS_CPU_MAX_N) if device == "cpu" else (lambda c: True)
    chosen, chosen_backward = [c for c in cases if short(c)], [c for c in backward_cases if short(c)]
    chosen_fp8 = [c for c in fp8_cases if short(c)]
    tick = Ticker(report.backend, len(chosen) + len(chosen_backward) + len(chosen_fp8), progress)

    def forward(r: PassReport) -> None:
        for case in chosen:
            r.cases += 1
            for mode, offset in case.out:
                r.note(f"{case.spec.name} {mode}/{offset:g}", crossframework.cross_check(
                    case.x, case.weight, case.spec.eps, case.residual, mode, offset, device=device))
            tick()
        r.reason = f"on {device}"

    def backward(r: PassReport) -> None:
        for case in chosen_backward:
            r.cases += 1
            for mode, offset in case.expected:
                args = (case.x, case.weight, case.grad_out, case.spec.eps, case.residual, case.grad_new_residual,
                        mode, offset)
                if device == "cpu":
                    rows, cols = subnormals.flushed(*args)
                    if rows.any() or cols.any():  # the whole check is left out: every row and column
                        r.flushed += rows.size + cols.size
                        continue
                r.note(f"{case.spec.name} {mode}/{offset:g}",
                       crossframework_backward.cross_check_backward(*args, device=device))
            tick()
        r.reason = f"on {device}"

    def fp8(r: PassReport) -> None:
        fp8_reason = crossframework_fp8.fp8_probe()
        if fp8_reason is not None:
            raise Unavailable(fp8_reason)
        for case in chosen_fp8:
            r.cases += 1
            for mode, offset in case.spec.outputs:
                r.note(f"{case.spec.name} {mode}/{offset:g}", crossframework_fp8.cross_check_fp8(
                    case.x, case.weight, case.spec.eps, case.residual, mode, offset, case.quantization(),
                    device=device))
            tick()
        r.reason = f"on {device}; FP8 through DLPack {crossframework_fp8.fp8_dlpack_route(device)}"

    report.forward = run_pass(forward, backward=False)
    tick.reach(len(chosen))
    report.backward = run_pass(backward, backward=True)
    tick.reach(len(chosen) + len(chosen_backward))
    report.fp8 = run_pass(fp8, backward=False)
    tick.reach(len(chosen) + len(chosen_backward) + len(chosen_fp8))
    report.status = overall_status(report)
    return report


def _fp8_invariance_cases(cases: Sequence, quick: bool) -> list:
    """A static and a per-group case of each dtype (the first with n <= FP8_INVARIANCE_MAX_N); with
    quick, one of each."""
    chosen = {}
    for c in cases:
        if c.spec.n <= FP8_INVARIANCE_MAX_N:
            chosen.setdefault(("" if quick else c.spec.dtype, c.spec.group_size is None), c)
    return list(chosen.values())


def _plan(dtypes: Optional[Sequence[str]], quick: bool, corpus_dir: Path) -> Plan:
    """What every backend runs; loading it also checks the corpus's digests."""
    cases = _select_cases(golden.load_corpus(corpus_dir), dtypes, quick)
    backward_cases = _select_cases(golden.load_backward_corpus(corpus_dir), dtypes, quick)
    fp8_cases = _select_cases(golden.load_fp8_corpus(corpus_dir), dtypes, quick)
    sizes, backward_sizes = ((128,), (128,)) if quick else (INVARIANCE_SIZES, BACKWARD_INVARIANCE_SIZES)
    return Plan(cases, [c for c in cases if c.spec.n in sizes and c.spec.residual in ("none", "float32")],
                QUICK_INVARIANCE_BATCHES if quick else INVARIANCE_BATCHES,
                backward_cases, [c for c in backward_cases if c.spec.n in backward_sizes],
                QUICK_INVARIANCE_BATCHES if quick else BACKWARD_INVARIANCE_BATCHES,
                fp8_cases, _fp8_invariance_cases(fp8_cases, quick))


def _run(name: str, plan: Plan, progress: Progress) -> BackendReport:
    if name == CROSS_FRAMEWORK:
        return run_cross_framework(plan.cases, plan.backward_cases, progress, plan.fp8_cases)
    return run_backend(BACKEND_BY_NAME[name], plan, progress)


def _run_in_worker(name: str, dtypes, quick: bool, corpus_dir: Path, queue) -> BackendReport:
    """One backend in a process of its own; progress goes back through queue."""
    return _run(name, _plan(dtypes, quick, corpus_dir), lambda *event: queue.put(event))


def verify(
    backend_names: Optional[Iterable[str]] = None,
    dtypes: Optional[Sequence[str]] = None,
    quick: bool = False,
    corpus_dir: Path = golden.DEFAULT_DIR,
    progress: Optional[Progress] = None,
    jobs: int = 1,
) -> List[BackendReport]:
    """Run the corpus and the invariance sweep, forward, backward and FP8, through each named backend
    (default: all), then the cross-framework check; with jobs > 1, that many backends at a time,
    each in its own process."""
    names = list(backend_names) if backend_names else [b.name for b in BACKENDS] + [CROSS_FRAMEWORK]
    progress = progress or (lambda *a: None)
    plan = _plan(dtypes, quick, corpus_dir)  # also checks the corpus before any worker starts
    if jobs <= 1 or len(names) == 1:
        return [_run(name, plan, progress) for name in names]
    # Compiles and interpreters dominate, and they are per process: backends side by side finish
    # in the time of the slowest. Each worker imports its framework afresh (spawn, not fork).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several JAX processes share a GPU
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(min(jobs, len(names)), mp_context=context) as pool:
        queue = manager.Queue()
        futures = {name: pool.submit(_run_in_worker, name, dtypes, quick, corpus_dir, queue) for name in names}
        pending = set(futures.values())
        while pending:
            _, pending = wait(pending, timeout=0.2)
            while not queue.empty():
                progress(*queue.get())
        reports = []
        for name, future in futures.items():
            try:
                reports.append(future.result())
            except Exception as e:  # the worker process died (a crash in native code, say)
                reports.append(BackendReport(name, "error", f"worker process failed: {type(e).__name__}: {e}"))
        return reports

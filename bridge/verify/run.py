"""`bi-norm verify`: the golden corpus and a batch-invariance sweep through every backend.

Three passes per backend: the forward (v1), the backward (v1.1) and the FP8 output (v1.2); then
the cross-framework row, bi_torch against bi_jax on the same memory, for the same three
(`bridge.verify.crossframework`). How each pass checks a runner: `bridge.verify.checks`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from .. import golden
from .backends import BACKENDS, Backend
from .checks import _check_backward_corpus, _check_corpus, _check_fp8_corpus, _outputs, _sweep
from .crossframework import CROSS_FRAMEWORK, run_cross_framework
from .report import BackendReport, PassReport, Progress, Ticker, Unavailable, overall_status, run_pass

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


def _up_to(cases: Sequence, max_n: Optional[int]) -> list:
    return [c for c in cases if max_n is None or c.spec.n <= max_n]


def run_backend(backend: Backend, plan: Plan, progress: Progress) -> BackendReport:
    report = BackendReport(backend.name, "ok")
    reason = backend.probe()
    if reason is not None:
        report.status, report.reason = "unavailable", reason
        return report
    tick = Ticker(backend.name, plan.steps(), progress)

    max_n = None if backend.max_n is None else backend.max_n()

    def up_to_max_n(r: PassReport, all_cases: Sequence, all_swept: Sequence) -> Tuple[list, list]:
        """The pass's corpus and sweep cases the kernel takes; the reason counts the others."""
        cases, swept = _up_to(all_cases, max_n), _up_to(all_swept, max_n)
        left = len(all_cases) - len(cases) + len(all_swept) - len(swept)
        if left:
            r.reason = f"{left} corpus and sweep cases with n > {max_n} not run: the kernel's widest row"
        return cases, swept

    def forward(r: PassReport) -> None:
        run = backend.make_runner()
        cases, invariance_cases = up_to_max_n(r, plan.cases, plan.invariance_cases)
        _check_corpus(run, cases, r, tick)
        _sweep(invariance_cases, plan.batches, r, tick, ("out", "new_residual"), lambda c: (c.x, c.residual),
               lambda c, rows: _outputs(run(rows[0], c.weight, c.spec.eps, rows[1], *c.spec.outputs[0]),
                                        rows[1] is not None))

    def backward(r: PassReport) -> None:
        run = backend.make_backward_runner()
        cases, invariance_cases = up_to_max_n(r, plan.backward_cases, plan.backward_invariance_cases)
        _check_backward_corpus(run, cases, r, tick, backend.flushes_subnormals)
        # grad_x and grad_residual only: grad_weight sums every row of the batch.
        _sweep(invariance_cases, plan.backward_batches, r, tick, ("grad_x", "grad_residual"),
               lambda c: (c.x, c.grad_out, c.residual, c.grad_new_residual),
               lambda c, rows: run(rows[0], c.weight, rows[1], c.spec.eps, *rows[2:], *c.spec.outputs[0])[:-1])

    def fp8(r: PassReport) -> None:
        if backend.make_fp8_runner is None:
            raise Unavailable(f"{backend.name} has no FP8 runner")
        run = backend.make_fp8_runner()
        cases, invariance_cases = up_to_max_n(r, plan.fp8_cases, plan.fp8_invariance_cases)
        _check_fp8_corpus(run, cases, r, tick)
        _sweep(invariance_cases, plan.fp8_batches, r, tick, ("out", "scales", "new_residual"),
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
    corpus_dir: Optional[Path] = None,
    progress: Optional[Progress] = None,
    jobs: int = 1,
) -> List[BackendReport]:
    """Run the corpus and the invariance sweep, forward, backward and FP8, through each named backend
    (default: all), then the cross-framework check; with jobs > 1, that many backends at a time,
    each in its own process. corpus_dir: by default golden.corpus_dir() (tests/golden/ in a checkout)."""
    corpus_dir = golden.corpus_dir() if corpus_dir is None else corpus_dir
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

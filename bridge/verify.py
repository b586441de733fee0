"""`bi-norm verify`: the golden corpus and a batch-invariance sweep through every backend."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np

from . import crossframework, golden
from .backends import BACKENDS, Backend
from .compare import first_mismatch

QUICK_MAX_N = 1025
INVARIANCE_SIZES = (7, 128, 1000, 4096, 65536)
INVARIANCE_BATCHES = (1, 2, 5, 33)
QUICK_INVARIANCE_BATCHES = (1, 5)
# The cross-framework row: bi_torch's result handed to JAX zero-copy and compared there.
CROSS_FRAMEWORK = "torch-jax-dlpack"
# On CPU both kernels run in interpreters: the cross check keeps to short rows there.
CROSS_CPU_MAX_N = 129
BACKEND_BY_NAME = {b.name: b for b in BACKENDS}


@dataclasses.dataclass
class BackendReport:
    backend: str
    status: str  # "ok", "mismatch", "error" or "unavailable"
    reason: str = ""
    cases: int = 0
    checks: int = 0
    mismatches: int = 0
    invariance_checks: int = 0
    invariance_mismatches: int = 0
    first_mismatch: str = ""
    seconds: float = 0.0


Progress = Callable[[str, int, int], None]


def _select_cases(cases: Sequence[golden.GoldenCase], dtypes: Optional[Sequence[str]], quick: bool):
    return [c for c in cases if (not dtypes or c.spec.dtype in dtypes) and (not quick or c.spec.n <= QUICK_MAX_N)]


def _invariance_cases(cases: Sequence[golden.GoldenCase], quick: bool):
    sizes = (128,) if quick else INVARIANCE_SIZES
    return [c for c in cases if c.spec.n in sizes and c.spec.residual in ("none", "float32")]


def _outputs(result, has_residual: bool):
    return result if has_residual else (result, None)


def _check_corpus(run, cases, report: BackendReport, progress: Progress, total: int, done: int) -> int:
    for case in cases:
        report.cases += 1
        for (mode, offset), expected in case.out.items():
            out, new_res = _outputs(run(case.x, case.weight, case.spec.eps, case.residual, mode, offset),
                                    case.residual is not None)
            pairs = [("out", expected, out)]
            if case.residual is not None:
                pairs.append(("new_residual", case.new_residual, new_res))
            for what, exp, got in pairs:
                report.checks += 1
                problem = first_mismatch(exp, got)
                if problem:
                    report.mismatches += 1
                    report.first_mismatch = report.first_mismatch or f"{case.spec.name} {mode}/{offset:g} {what}: {problem}"
        done += 1
        progress(report.backend, done, total)
    return done


def _neighbours(rng: np.random.Generator, like: np.ndarray, rows: int) -> np.ndarray:
    return (rng.standard_normal((rows, like.shape[-1])) * 4).astype(np.float32).astype(like.dtype)


def _check_invariance(run, cases, batches, report: BackendReport, progress: Progress, total: int, done: int) -> int:
    rng = np.random.default_rng(0)
    for case in cases:
        mode, offset = case.spec.outputs[0]
        x, res = case.x[:1], None if case.residual is None else case.residual[:1]
        alone = _outputs(run(x, case.weight, case.spec.eps, res, mode, offset), res is not None)
        for batch in batches:
            pos = (batch * 5) // 7
            xb = _neighbours(rng, x, batch)
            xb[pos] = x[0]
            rb = None
            if res is not None:
                rb = _neighbours(rng, res, batch)
                rb[pos] = res[0]
            # A 3-D leading shape, as a model's (batch, seq, hidden) activations have.
            got = _outputs(run(xb.reshape(batch, 1, -1), case.weight, case.spec.eps,
                               None if rb is None else rb.reshape(batch, 1, -1), mode, offset), rb is not None)
            for what, exp, g in zip(("out", "new_residual"), alone, got):
                if exp is None:
                    continue
                report.invariance_checks += 1
                problem = first_mismatch(exp[0], g[pos, 0])
                if problem:
                    report.invariance_mismatches += 1
                    report.first_mismatch = report.first_mismatch or (
                        f"invariance {case.spec.name} batch {batch} row {pos} {what}: {problem}")
        done += 1
        progress(report.backend, done, total)
    return done


def run_backend(backend: Backend, cases, invariance_cases, batches, progress: Progress) -> BackendReport:
    report = BackendReport(backend.name, "ok")
    reason = backend.probe()
    if reason is not None:
        report.status, report.reason = "unavailable", reason
        return report
    start = time.perf_counter()
    total = len(cases) + len(invariance_cases)
    try:
        run = backend.make_runner()
        done = _check_corpus(run, cases, report, progress, total, 0)
        _check_invariance(run, invariance_cases, batches, report, progress, total, done)
    except Exception as e:  # a backend that crashes is reported, not fatal to the others
        report.status, report.reason = "error", f"{type(e).__name__}: {e}"
    report.seconds = time.perf_counter() - start
    if report.status == "ok" and (report.mismatches or report.invariance_mismatches):
        report.status = "mismatch"
    return report


def run_cross_framework(cases, progress: Progress) -> BackendReport:
    """bi_torch and bi_jax on the same inputs, bits compared on the device through DLPack."""
    report = BackendReport(CROSS_FRAMEWORK, "ok")
    reason = crossframework.probe()
    if reason is not None:
        report.status, report.reason = "unavailable", reason
        return report
    start = time.perf_counter()
    try:
        device = crossframework.best_device()
        if device == "cpu":
            cases = [c for c in cases if c.spec.n <= CROSS_CPU_MAX_N]
        for done, case in enumerate(cases, 1):
            report.cases += 1
            for mode, offset in case.out:
                report.checks += 1
                problem = crossframework.cross_check(case.x, case.weight, case.spec.eps, case.residual, mode, offset,
                                                     device=device)
                if problem:
                    report.mismatches += 1
                    report.first_mismatch = report.first_mismatch or f"{case.spec.name} {mode}/{offset:g} {problem}"
            progress(report.backend, done, len(cases))
        report.reason = f"on {device}"
    except Exception as e:  # reported like a crashing backend
        report.status, report.reason = "error", f"{type(e).__name__}: {e}"
    report.seconds = time.perf_counter() - start
    if report.status == "ok" and report.mismatches:
        report.status = "mismatch"
    return report


def _plan(dtypes: Optional[Sequence[str]], quick: bool, corpus_dir: Path):
    """The corpus cases, the invariance cases and the batch sizes one backend runs."""
    cases = _select_cases(golden.load_corpus(corpus_dir), dtypes, quick)
    return cases, _invariance_cases(cases, quick), QUICK_INVARIANCE_BATCHES if quick else INVARIANCE_BATCHES


def _run(name: str, cases, invariance_cases, batches, progress: Progress) -> BackendReport:
    if name == CROSS_FRAMEWORK:
        return run_cross_framework(cases, progress)
    return run_backend(BACKEND_BY_NAME[name], cases, invariance_cases, batches, progress)


def _run_in_worker(name: str, dtypes, quick: bool, corpus_dir: Path, queue) -> BackendReport:
    """One backend in a process of its own; progress goes back through queue."""
    return _run(name, *_plan(dtypes, quick, corpus_dir), lambda *event: queue.put(event))


def verify(
    backend_names: Optional[Iterable[str]] = None,
    dtypes: Optional[Sequence[str]] = None,
    quick: bool = False,
    corpus_dir: Path = golden.DEFAULT_DIR,
    progress: Optional[Progress] = None,
    jobs: int = 1,
) -> List[BackendReport]:
    """Run the corpus and the invariance sweep through each named backend (default: all), then the
    cross-framework check; with jobs > 1, that many backends at a time, each in its own process."""
    names = list(backend_names) if backend_names else [b.name for b in BACKENDS] + [CROSS_FRAMEWORK]
    progress = progress or (lambda *a: None)
    plan = _plan(dtypes, quick, corpus_dir)  # also checks the corpus before any worker starts
    if jobs <= 1 or len(names) == 1:
        return [_run(name, *plan, progress) for name in names]
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


def terminal_progress(stream=None) -> Progress:
    """A one-line progress bar on a terminal; on a log, a line per quarter of each backend's work."""
    def show(backend: str, done: int, total: int) -> None:
        out = stream or sys.stderr
        if not out.isatty():
            if done == total or (4 * done) // total != (4 * (done - 1)) // total:
                out.write(f"{backend}: {done}/{total}\n")
            return
        width = 30
        filled = width * done // max(total, 1)
        out.write(f"\r{backend:<18} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            out.write("\r" + " " * (width + 40) + "\r")
        out.flush()
    return show


def format_table(reports: Sequence[BackendReport]) -> str:
    header = f"{'backend':<18} {'status':<11} {'cases':>5} {'checks':>6} {'mismatch':>8} {'invariance':>10}  first mismatch / note"
    lines = [header, "-" * len(header)]
    for r in reports:
        inv = f"{r.invariance_checks - r.invariance_mismatches}/{r.invariance_checks}"
        note = r.first_mismatch or r.reason or (f"{r.seconds:.1f}s" if r.status == "ok" else "")
        lines.append(f"{r.backend:<18} {r.status:<11} {r.cases:>5} {r.checks:>6} {r.mismatches:>8} {inv:>10}  {note}")
    return "\n".join(lines)

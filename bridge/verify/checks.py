"""How `bi-norm verify` checks one backend's runner in a pass: a corpus against its expected bits
(forward; backward, outside the subnormals a flushing backend flushes; FP8: out, scales, new
residual), and the batch-invariance sweep (a row alone vs inside batches of random rows).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..golden import backward as golden_backward
from ..numerics import subnormals
from .compare import first_mismatch
from .report import PassReport, Ticker


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

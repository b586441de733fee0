"""`bi-norm verify`'s cross-framework row: bi_torch against bi_jax on the same device memory
(bridge.interop's checks), forward, backward and FP8."""

from __future__ import annotations

from typing import Sequence

from ..interop import crossframework, device
from ..interop.backward import cross_check_backward
from ..interop.fp8 import cross_check_fp8, fp8_dlpack_route, fp8_probe
from ..numerics import subnormals
from .report import BackendReport, PassReport, Progress, Ticker, Unavailable, overall_status, run_pass

# The cross-framework row: bi_torch's result handed to JAX zero-copy and compared there.
CROSS_FRAMEWORK = "torch-jax-dlpack"
# On CPU both kernels run in interpreters: the cross check keeps to short rows there.
CROSS_CPU_MAX_N = 129


def run_cross_framework(cases, backward_cases, progress: Progress, fp8_cases: Sequence = ()) -> BackendReport:
    """bi_torch and bi_jax on the same inputs, bits compared on the device through DLPack: the
    forward's corpus, the backward's (on a CPU, short rows, and the gradient cases whose steps
    meet no float32 subnormal: XLA:CPU flushes those in bi_jax's interpret mode) and the FP8 corpus
    (on a CPU, short rows)."""
    report = BackendReport(CROSS_FRAMEWORK, "ok")
    reason = device.probe()
    if reason is not None:
        report.status, report.reason = "unavailable", reason
        return report
    target = device.best_device()
    short = (lambda c: c.spec.n <= CROSS_CPU_MAX_N) if target == "cpu" else (lambda c: True)
    chosen, chosen_backward = [c for c in cases if short(c)], [c for c in backward_cases if short(c)]
    chosen_fp8 = [c for c in fp8_cases if short(c)]
    tick = Ticker(report.backend, len(chosen) + len(chosen_backward) + len(chosen_fp8), progress)

    def forward(r: PassReport) -> None:
        for case in chosen:
            r.cases += 1
            for mode, offset in case.out:
                r.note(f"{case.spec.name} {mode}/{offset:g}", crossframework.cross_check(
                    case.x, case.weight, case.spec.eps, case.residual, mode, offset, device=target))
            tick()
        r.reason = f"on {target}"

    def backward(r: PassReport) -> None:
        for case in chosen_backward:
            r.cases += 1
            for mode, offset in case.expected:
                args = (case.x, case.weight, case.grad_out, case.spec.eps, case.residual, case.grad_new_residual,
                        mode, offset)
                if target == "cpu":
                    rows, cols = subnormals.flushed(*args)
                    if rows.any() or cols.any():  # the whole check is left out: every row and column
                        r.flushed += rows.size + cols.size
                        continue
                r.note(f"{case.spec.name} {mode}/{offset:g}",
                       cross_check_backward(*args, device=target))
            tick()
        r.reason = f"on {target}"

    def fp8(r: PassReport) -> None:
        fp8_reason = fp8_probe()
        if fp8_reason is not None:
            raise Unavailable(fp8_reason)
        for case in chosen_fp8:
            r.cases += 1
            for mode, offset in case.spec.outputs:
                r.note(f"{case.spec.name} {mode}/{offset:g}", cross_check_fp8(
                    case.x, case.weight, case.spec.eps, case.residual, mode, offset, case.quantization(),
                    device=target))
            tick()
        r.reason = f"on {target}; FP8 through DLPack {fp8_dlpack_route(target)}"

    report.forward = run_pass(forward, backward=False)
    tick.reach(len(chosen))
    report.backward = run_pass(backward, backward=True)
    tick.reach(len(chosen) + len(chosen_backward))
    report.fp8 = run_pass(fp8, backward=False)
    tick.reach(len(chosen) + len(chosen_backward) + len(chosen_fp8))
    report.status = overall_status(report)
    return report

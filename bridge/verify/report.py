"""What `bi-norm verify` reports: a pass (forward, backward, FP8) per backend, and running one."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

NOT_IMPLEMENTED = "not implemented"
# An FP8 pass whose backend's API has no FP8 output (yet): reported with the reason, never as a pass.
NOT_AVAILABLE = "not available"
Progress = Callable[[str, int, int], None]


class Unavailable(Exception):
    """Raised by a backend's runner factory for a pass its API cannot run (the reason is the message)."""


@dataclasses.dataclass
class PassReport:
    """One pass (forward, backward or FP8) of one backend: the corpus and the invariance sweep."""

    # "ok", "mismatch", "error", "not implemented" (a backward the kernel lacks) or "not available"
    # (an FP8 output the API lacks)
    status: str = "ok"
    reason: str = ""
    cases: int = 0
    checks: int = 0
    mismatches: int = 0
    invariance_checks: int = 0
    invariance_mismatches: int = 0
    first_mismatch: str = ""
    seconds: float = 0.0
    flushed: int = 0  # gradient rows and columns not compared: XLA:CPU flushes subnormals (numerics/subnormals.py)

    def note(self, where: str, problem: Optional[str], invariance: bool = False) -> None:
        """Count one bitwise comparison; problem is first_mismatch's answer (None: equal)."""
        if invariance:
            self.invariance_checks += 1
            self.invariance_mismatches += problem is not None
        else:
            self.checks += 1
            self.mismatches += problem is not None
        if problem is not None and not self.first_mismatch:
            self.first_mismatch = f"{where}: {problem}"


@dataclasses.dataclass
class BackendReport:
    backend: str
    # "ok", "mismatch", "error" or "unavailable"; a backward not implemented or an FP8 pass not
    # available leaves it "ok"
    status: str
    reason: str = ""  # why unavailable, or why its worker process failed
    forward: PassReport = dataclasses.field(default_factory=PassReport)
    backward: Optional[PassReport] = None  # None: not run (the backend is unavailable)
    fp8: Optional[PassReport] = None  # None: not run (the backend is unavailable)


class Ticker:
    """Progress in cases done out of the plan's steps."""

    def __init__(self, backend: str, total: int, progress: Progress) -> None:
        self.backend, self.total, self.progress, self.done = backend, total, progress, 0

    def __call__(self) -> None:
        self.reach(self.done + 1)

    def reach(self, done: int) -> None:
        """Move on to `done` steps (after a pass that crashed, past the cases it did not run)."""
        if done > self.done:
            self.done = done
            self.progress(self.backend, done, self.total)


def run_pass(check: Callable[[PassReport], None], backward: bool) -> PassReport:
    """check(report) timed; a crash is the pass's error (a backward the framework lacks: not
    implemented; a pass whose runner factory raises Unavailable: not available)."""
    report = PassReport()
    start = time.perf_counter()
    try:
        check(report)
    except Unavailable as e:
        report.status, report.reason = NOT_AVAILABLE, str(e)
    except NotImplementedError as e:
        report.status = NOT_IMPLEMENTED if backward else "error"
        report.reason = f"{type(e).__name__}: {e}"
    except Exception as e:  # a backend that crashes is reported, not fatal to the others
        report.status, report.reason = "error", f"{type(e).__name__}: {e}"
    report.seconds = time.perf_counter() - start
    if report.status == "ok" and (report.mismatches or report.invariance_mismatches):
        report.status = "mismatch"
    return report


def overall_status(report: BackendReport) -> str:
    statuses = [p.status for p in (report.forward, report.backward, report.fp8) if p is not None]
    return "error" if "error" in statuses else "mismatch" if "mismatch" in statuses else "ok"

"""The GPU suite's memory phases (scripts/gpu_suite.sh): tests/conftest.py marks `bigmem` exactly the
GPU tests over 2**31 elements and the 4096-row invariance sweeps of wide rows, so that the first,
many-worker phase (`-m "(gpu or codegen) and not bigmem"`) leaves them out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _collected(marks: str) -> list:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m",
                           marks, "tests"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_bigmem_marks_the_huge_tests_and_the_wide_sweeps_only():
    big = _collected("gpu and bigmem")
    huge = [t for t in big if "2_31" in t or "two_to_the_31" in t]
    assert len(huge) == 3, huge  # torch forward, torch backward, the JAX split
    sweeps = [t for t in big if t not in huge]
    assert sweeps and all("invariance" in t for t in sweeps), sweeps
    assert any("n65536" in t or "65536" in t.split("[")[1] for t in sweeps)
    assert not any("[128-" in t or "n128-" in t or "-128]" in t for t in sweeps), "a narrow sweep is marked"
    rest = _collected("(gpu or codegen) and not bigmem")
    assert rest and not set(rest) & set(big)

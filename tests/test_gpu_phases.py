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


def test_longest_first_puts_the_gpu_sweeps_first_and_keeps_the_rest_in_order():
    from types import SimpleNamespace

    from conftest import longest_first

    def item(name, n=None, gpu=True):
        return SimpleNamespace(name=name, keywords={"gpu": True} if gpu else {},
                               callspec=SimpleNamespace(params={} if n is None else {"n": n}))

    items = [item("test_a"), item("test_batch_invariance_cuda[128]", 128), item("test_b", gpu=False),
             item("test_batch_invariance_1_to_4096[n8192]", 8192), item("test_invariance_on_cpu", 65536, gpu=False),
             item("test_grad_x_invariance_1_to_4096[n4096]", 4096), item("test_c", 65536)]
    got = [i.name for i in longest_first(items)]
    assert got == ["test_grad_x_invariance_1_to_4096[n4096]", "test_batch_invariance_1_to_4096[n8192]",
                   "test_batch_invariance_cuda[128]", "test_a", "test_b", "test_invariance_on_cpu", "test_c"], got

"""Shared fixtures: the golden corpus, the host mesh of the sharding tests, and the `gpu` marker's skip rule."""

from __future__ import annotations

import os

# Several host devices for the JAX sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import pytest

from bridge import golden


@pytest.fixture(scope="session")
def corpus():
    return golden.load_corpus()


@pytest.fixture(scope="session")
def cases_by_name(corpus):
    return {case.spec.name: case for case in corpus}


@pytest.fixture(scope="session")
def backward_corpus():
    """The backward cases (bridge.golden.backward.BackwardCase) by name, in the manifest's order."""
    return {case.spec.name: case for case in golden.load_backward_corpus()}


@pytest.fixture(scope="session")
def fp8_cases():
    """The FP8 cases (bridge.golden.fp8.Fp8Case) by name, in the manifest's order."""
    return {case.spec.name: case for case in golden.load_fp8_corpus()}


@pytest.fixture(scope="session")
def mesh():
    """A one-axis ("b") mesh over the 4 host devices XLA_FLAGS asks for above."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = jax.devices()
    assert len(devices) == 4, "tests/conftest.py sets --xla_force_host_platform_device_count=4"
    return Mesh(np.array(devices), ("b",))


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after a test, so that each test compiles afresh."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _needs_much_gpu_memory(item) -> bool:
    """GPU tests over more than 2**31 elements (24-50 GB), or 4096-row sweeps of wide rows (n >= 16384,
    or float32 from 5120): beside a dozen pytest-xdist workers on an 80 GB H100 these ran out of
    memory (each passes alone), so they carry `bigmem`, which scripts/gpu_suite.sh runs one at a time."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    n = params.get("n", 0)
    wide_sweep = "invariance" in item.name and (n >= 16384 or (n >= 5120 and params.get("dtype") == "float32"))
    return "gpu" in item.keywords and ("2_31" in item.name or "two_to_the_31" in item.name or wide_sweep)


def longest_first(items: list) -> list:
    """The GPU batch-invariance sweeps first (gradients before forwards, wide rows before narrow),
    the rest in collection order. Under pytest-xdist the run lasts as long as its slowest worker:
    collected last, the JAX sweeps (one compile per batch size) ran one after another on one
    worker at the end, past a device call's 10 minutes (H100, 2026-12-06b). Sorting is stable."""
    def key(item):
        n = getattr(getattr(item, "callspec", None), "params", {}).get("n", 0)
        sweep = "gpu" in item.keywords and "invariance" in item.name
        return (False, "grad" not in item.name, -n) if sweep else (True,)
    return sorted(items, key=key)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _needs_much_gpu_memory(item):
            item.add_marker(pytest.mark.bigmem)
    if _cuda_available():
        items[:] = longest_first(items)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With $BI_NORM_TEST_TIMES (a folder), each test's call time goes to a file per process as it
    finishes, so that a run cut short by its time limit still says where the time went
    (scripts/gpu_suite.sh prints the slowest)."""
    folder = os.environ.get("BI_NORM_TEST_TIMES")
    if folder and report.when == "call":
        os.makedirs(folder, exist_ok=True)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(os.path.join(folder, f"{worker}.tsv"), "a") as f:
            f.write(f"{report.duration:.2f}\t{report.outcome}\t{report.nodeid}\n")

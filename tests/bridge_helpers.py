"""Shared helpers for the bridge tests on the CPU (test_bridge_cpu.py, test_crossframework_cpu.py):
arbitrary bit patterns, numpy <-> torch through the bits, and JAX kept on the CPU.
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

import bi_torch
from bridge import reference

NUMPY = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


@pytest.fixture(autouse=True)
def jax_on_the_cpu():
    """JAX arrays made here live on the CPU, as the torch tensors do, on any machine (autouse in
    each module that imports it)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def random_bits(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    """Arbitrary bit patterns of `dtype`: NaN payloads, signed zeros, subnormals, infinities included."""
    width = NUMPY[dtype].itemsize
    ints = rng.integers(0, 2 ** (8 * width), size=shape, dtype=np.uint64).astype(f"uint{8 * width}")
    return ints.view(NUMPY[dtype])


def torch_from_numpy(a: np.ndarray) -> torch.Tensor:
    """A new torch tensor (torch's allocator: 64-byte aligned) with exactly a's bits."""
    ints = reference.bits(a).view({2: np.int16, 4: np.int32}[a.dtype.itemsize])
    return torch.tensor(ints).view(bi_torch.torch_dtype(reference.dtype_name(a.dtype)))


def torch_bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


def numpy_of_torch(t: torch.Tensor) -> np.ndarray:
    return torch_bits(t).view(NUMPY[bi_torch.dtype_name(t.dtype)])


def cross_inputs(rng: np.random.Generator, dtype: str, residual: str, shape) -> tuple:
    """(x, weight, residual or None) for a cross-framework check: rows of scales 2**-4..2**4, a
    residual of x's dtype ("same") or float32, or none."""
    scale = np.exp2(rng.uniform(-4, 4, shape[:-1] + (1,)))
    x = (rng.standard_normal(shape) * scale).astype(np.float32).astype(NUMPY[dtype])
    w = rng.standard_normal(shape[-1]).astype(np.float32).astype(NUMPY[dtype])
    r = None if residual == "none" else rng.standard_normal(shape).astype(np.float32).astype(
        NUMPY[dtype] if residual == "same" else np.float32)
    return x, w, r

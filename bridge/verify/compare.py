"""Bitwise comparison through integer views, reporting the first differing element."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..numerics.reference import bits, dtype_name


def first_mismatch(expected: np.ndarray, actual: np.ndarray) -> Optional[str]:
    """None if the two arrays have the same shape, dtype and bits; else a one-line description."""
    if expected.shape != actual.shape:
        return f"shape {actual.shape} != expected {expected.shape}"
    if dtype_name(expected.dtype) != dtype_name(actual.dtype):
        return f"dtype {dtype_name(actual.dtype)} != expected {dtype_name(expected.dtype)}"
    e, a = bits(expected), bits(actual)
    diff = np.flatnonzero(e.ravel() != a.ravel())
    if diff.size == 0:
        return None
    i = int(diff[0])
    where = np.unravel_index(i, expected.shape)
    width = e.dtype.itemsize * 2
    return (f"{diff.size} of {e.size} elements differ; first at index {tuple(int(k) for k in where)}: "
            f"got {actual.ravel()[i]!r} (0x{int(a.ravel()[i]):0{width}x}), "
            f"expected {expected.ravel()[i]!r} (0x{int(e.ravel()[i]):0{width}x})")


def assert_bitwise_equal(expected: np.ndarray, actual: np.ndarray, what: str = "") -> None:
    """AssertionError naming the first differing index and both values when the bits differ."""
    problem = first_mismatch(expected, actual)
    if problem is not None:
        raise AssertionError(f"{what}: {problem}" if what else problem)

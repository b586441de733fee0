"""Shared by the reference tests: numpy dtypes, their rounding units, and inputs by value or bits."""

from __future__ import annotations

import ml_dtypes
import numpy as np

NP = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
# Unit roundoff (half an ulp, relative) and the smallest subnormal of each dtype.
UNIT = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
SUBNORMAL = {"float32": 2.0**-149, "bfloat16": 2.0**-133, "float16": 2.0**-24}
U32 = UNIT["float32"]
MODES_OFFSETS = [(m, o) for m in ("llama", "fp32") for o in (0.0, 1.0)]


def rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to float32, then to dtype."""
    return np.asarray(a, np.float64).astype(np.float32).astype(NP[dtype])


def from_bits(values: list, dtype: str) -> np.ndarray:
    """An array of dtype with exactly these bit patterns."""
    width = np.uint32 if dtype == "float32" else np.uint16
    return np.array(values, width).view(NP[dtype])

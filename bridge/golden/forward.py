"""The golden corpus's forward cases (contract v1): their list, inputs and expected outputs, and the
row patterns, weights and dtypes that the backward (`golden.backward`) and FP8 (`golden.fp8`) cases
build on.

Inputs come from a generator seeded by the case name, expected outputs from `bridge.reference`;
`bridge.golden` writes, checks and loads the cases (the manifest's "cases").
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..numerics import reference

# Each case stores two of the four (mode, weight_offset) outputs, alternating, so that every pair
# is covered across the corpus at half the size.
OUTPUT_SETS = ((("llama", 0.0), ("fp32", 1.0)), (("llama", 1.0), ("fp32", 0.0)))
SIZES = (1, 2, 3, 7, 64, 100, 127, 128, 129, 1000, 1023, 1024, 1025, 2048, 4096, 5120, 8192, 16384, 65536)
# Row patterns that stress rounding and the special values NUMERICS.md defines.
PATTERNS = ("normal", "wide_range", "outliers", "tiny", "zeros", "huge", "inf", "nan", "mixed")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    name: str
    dtype: str
    n: int
    residual: str  # "none", "same" (x's dtype) or "float32"
    patterns: Tuple[str, ...]  # one per row
    eps: float
    outputs: Tuple[Tuple[str, float], ...]  # the (mode, weight_offset) pairs stored


@dataclasses.dataclass
class GoldenCase:
    spec: CaseSpec
    x: np.ndarray
    weight: np.ndarray
    residual: Optional[np.ndarray]
    # (mode, weight_offset) -> out; new_residual is the same for every mode and offset.
    out: Dict[Tuple[str, float], np.ndarray]
    new_residual: Optional[np.ndarray]


def _rows_for(n: int) -> int:
    if n <= 129:
        return len(PATTERNS)
    if n <= 1025:
        return 3
    if n <= 2048:
        return 2
    return 1


def case_specs() -> List[CaseSpec]:
    """The corpus: every dtype x residual kind for each n, except the longest rows (one kind each)."""
    specs = []
    for d in DTYPES:
        kinds = ("none", "float32") if d == "float32" else ("none", "same", "float32")
        for i, n in enumerate(SIZES):
            rows = _rows_for(n)
            chosen = kinds if n <= 4096 else (kinds[i % len(kinds)],)
            for k, kind in enumerate(chosen):
                start = (i + k) % len(PATTERNS)
                pats = PATTERNS if rows == len(PATTERNS) else tuple(
                    "mixed" if rows == 1 else PATTERNS[(start + r) % len(PATTERNS)] for r in range(rows))
                eps = 1e-5 if (i + k) % 3 == 0 else 1e-6
                specs.append(CaseSpec(f"{d}-n{n}-res_{kind}", d, n, kind, pats, eps, OUTPUT_SETS[(i + k) % 2]))
    return specs


def pattern_row(rng: np.random.Generator, pattern: str, n: int, dtype: str) -> np.ndarray:
    """One float64 row of the named pattern, scaled to the range of `dtype`."""
    f16 = dtype == "float16"
    sign = rng.choice([-1.0, 1.0], n)
    if pattern == "normal":
        return rng.standard_normal(n)
    if pattern == "wide_range":
        return sign * np.exp2(rng.uniform(-20, 15, n) if f16 else rng.uniform(-60, 60, n))
    if pattern == "outliers":
        row = rng.standard_normal(n)
        row[rng.integers(0, n, max(1, n // 64))] *= 300.0 if f16 else 3000.0
        return row
    if pattern == "tiny":  # float16 subnormals; float32 squares that underflow to subnormals
        return sign * np.exp2(rng.uniform(-24, -14, n) if f16 else rng.uniform(-70, -62, n))
    if pattern == "zeros":
        return np.zeros(n)
    if pattern == "huge":  # squares overflow float32 (float16 cannot: 65504^2 < 2^32)
        return sign * (np.exp2(rng.uniform(14, 15.9, n)) if f16 else np.exp2(rng.uniform(64, 70, n)))
    if pattern in ("inf", "nan"):
        row = rng.standard_normal(n)
        row[rng.integers(0, n)] = np.inf * rng.choice([-1.0, 1.0]) if pattern == "inf" else np.nan
        return row
    if pattern == "mixed":  # normal body, outlier channels and a tiny stretch in one long row
        row = rng.standard_normal(n)
        row[rng.integers(0, n, max(1, n // 256))] *= 300.0
        start = int(rng.integers(0, max(1, n - n // 8)))
        row[start:start + n // 8] *= 1e-3
        return row
    raise ValueError(f"unknown pattern {pattern!r}")


def as_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to float32, then to `dtype` (bfloat16 as ml_dtypes.bfloat16)."""
    with np.errstate(over="ignore"):
        return values.astype(np.float32).astype(reference.numpy_dtype(dtype))


def pattern_rows(rng: np.random.Generator, patterns: Tuple[str, ...], n: int, dtype: str, as_: str,
                 row: Callable[..., np.ndarray] = pattern_row) -> np.ndarray:
    """One row per pattern from `row(rng, pattern, n, dtype)`, scaled to `dtype`'s range, stored as `as_`."""
    return as_dtype(np.stack([row(rng, p, n, dtype) for p in patterns]), as_)


def random_weight(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    """Weights around 1 with one -0.0 (a signed zero and, at times, negative weights)."""
    w = 1.0 + 0.25 * rng.standard_normal(n)
    w[rng.integers(0, n)] = -0.0
    return as_dtype(w, dtype)


def generate_case(spec: CaseSpec) -> GoldenCase:
    """Inputs from a generator seeded by the case name; expected outputs from the reference."""
    rng = np.random.default_rng(zlib.crc32(spec.name.encode()))
    x = pattern_rows(rng, spec.patterns, spec.n, spec.dtype, spec.dtype)
    weight = random_weight(rng, spec.n, spec.dtype)
    residual = None
    if spec.residual != "none":
        residual = pattern_rows(rng, spec.patterns, spec.n, spec.dtype, residual_dtype(spec.dtype, spec.residual))
    out, new_residual = {}, None
    for mode, offset in spec.outputs:
        result = reference.rms_norm(x, weight, spec.eps, residual, mode=mode, weight_offset=offset)
        if residual is None:
            out[(mode, offset)] = result
        else:
            out[(mode, offset)], new_residual = result
    return GoldenCase(spec, x, weight, residual, out, new_residual)


def residual_dtype(dtype: str, kind: str) -> Optional[str]:
    """R for a residual kind ("none", "same", "float32") of a case in dtype D; None without one."""
    return {"none": None, "same": dtype, "float32": "float32"}[kind]

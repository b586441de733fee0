"""The golden corpus's FP8 cases (contract v1.2): inputs and expected FP8 outputs and scales.

They live beside the forward and backward cases in `tests/golden/`, in the same format (bridge.golden
writes, checks and loads them); the manifest lists them under "fp8_cases" with "kind": "fp8". FP8
outputs are stored as their uint8 codes, the scales as float32 bits. Expected bits come from
`bridge.reference.rms_norm(..., out_dtype="float8_e4m3fn", scale=... | group_size=...)` only.

Both scalings for every dtype: static (a float32 scale, stored as the "scale" array, of shape ()
or (1,) in turn: scales that saturate most values, put most among FP8's subnormals, or neither) and
per-token-group (64 and 128). The corpus is small (about 130,000 elements of x, about 1 MiB)
because the kernel suites run it through the Triton interpreter and Pallas interpret mode.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..numerics import reference
from . import forward
from .forward import DTYPES, OUTPUT_SETS
from .storage import output_key

OUT_DTYPE = "float8_e4m3fn"
# Row patterns of their own, besides forward.PATTERNS: whole 64-column groups of signed zeros
# in a normal row (a zero group's scale is the floor's), rows of signed zeros only (+0 and -0 codes),
# and magnitudes spread over 2**-14..1 (within a group, most values far below its amax: FP8 subnormals).
FP8_PATTERNS = ("zero_groups", "signed_zeros", "spread")
# Every pattern once, the ones with many distinct values (even places) between the special ones, so
# that a case of a few rows, which starts at an even place, has values to round in its first row.
PATTERNS = ("normal", "zeros", "spread", "nan", "outliers", "signed_zeros", "mixed", "inf", "zero_groups", "huge",
            "wide_range", "tiny")
assert sorted(PATTERNS) == sorted(forward.PATTERNS + FP8_PATTERNS)
# Weights: forward.random_weight (around 1, one -0.0), or that with 2**127 at columns 5, 305,
# ..., where x is +-4 in every other row, so that u = xhat * w overflows to inf there (float32 and
# bfloat16 only: float16 cannot reach it), and is huge (mostly finite) in the other rows.
WEIGHTS = ("random", "huge")
HUGE_COLUMNS = slice(5, None, 300)

# Per dtype: (n, rows, static scale or None, group size or None). rows 0: one row per pattern. The
# residual kind goes round the dtype's kinds (none, same, float32; float32's "same" is float32).
# Static scales: 0.0123 (most values normal FP8), 1e-4 (most saturate), 100 (most among FP8's
# subnormals), 0.5, 3.7 and 2**-3; rn(1/scale) is inexact for 0.0123, 1e-4, 100 and 3.7.
PLAN = ((64, 0, 0.0123, None), (100, 7, 1e-4, None), (320, 0, 100.0, None), (5120, 2, 0.5, None),
        (64, 0, None, 64), (192, 7, None, 64), (384, 5, None, 128), (1024, 3, None, 64), (4096, 2, None, 128))
# Beyond the plan: (dtype, n, rows, residual kind, static scale or None, group size or None, weight).
# Two long rows past one 16384-element chunk (one static n not a multiple of 64, one per group),
# and the huge weights whose u is inf.
EXTRA = (("bfloat16", 20000, 1, "float32", 3.7, None, "random"),
         ("float16", 20480, 1, "same", None, 128, "random"),
         ("float32", 128, 5, "none", None, 64, "huge"),
         ("bfloat16", 256, 6, "same", None, 128, "huge"),
         ("bfloat16", 128, 4, "none", 2.0**-3, None, "huge"),
         ("float32", 96, 9, "float32", 0.0123, None, "huge"))


@dataclasses.dataclass(frozen=True)
class Fp8Spec:
    name: str
    dtype: str  # D, x's dtype
    n: int
    residual: str  # "none", "same" (D) or "float32"
    patterns: Tuple[str, ...]  # one per row (PATTERNS)
    weight: str  # WEIGHTS
    eps: float
    outputs: Tuple[Tuple[str, float], ...]  # the (mode, weight_offset) pairs stored
    out_dtype: str
    scale: Optional[float]  # static: the float32 scale's value (the "scale" array holds it); else None
    group_size: Optional[int]  # per-token-group; else None


@dataclasses.dataclass
class Fp8Case:
    """One FP8 case, as the reference test, `bi-norm verify` and the kernel suites use it.

    - spec: the Fp8Spec it was generated from.
    - x: (rows, n) in D. weight: (n,) in D. residual: (rows, n) in R, or None.
    - scale: the static scale, a float32 array of shape () or (1,), or None for per-group cases.
    - out: (mode, weight_offset) -> the FP8 out (ml_dtypes.float8_e4m3fn, x's shape).
    - scales: (mode, weight_offset) -> the float32 scales, (rows, n // group_size); empty if static.
    - new_residual: (rows, n) in R, or None; the same for every mode and offset.
    """

    spec: Fp8Spec
    x: np.ndarray
    weight: np.ndarray
    residual: Optional[np.ndarray]
    scale: Optional[np.ndarray]
    out: Dict[Tuple[str, float], np.ndarray]
    scales: Dict[Tuple[str, float], np.ndarray]
    new_residual: Optional[np.ndarray]

    def quantization(self) -> dict:
        """The FP8 keyword arguments of reference.rms_norm for this case (out_dtype and scale or group_size)."""
        if self.scale is not None:
            return {"out_dtype": self.spec.out_dtype, "scale": self.scale}
        return {"out_dtype": self.spec.out_dtype, "group_size": self.spec.group_size}

    def expected(self, mode: str, offset: float) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """(out, scales or None, new_residual or None) for one stored (mode, offset)."""
        return self.out[(mode, offset)], self.scales.get((mode, offset)), self.new_residual


def _patterns(rows: int, k: int) -> Tuple[str, ...]:
    """Row patterns of the k-th case: one per pattern (rows 0), "mixed" for a single long row, else
    `rows` of PATTERNS in turn from an even place."""
    if rows == 0:
        return PATTERNS
    if rows == 1:
        return ("mixed",)
    return tuple(PATTERNS[(2 * k + r) % len(PATTERNS)] for r in range(rows))


def _name(d: str, n: int, rows: int, kind: str, scale: Optional[float], group: Optional[int], weight: str) -> str:
    quant = f"static{scale:g}" if scale is not None else f"g{group}"
    return f"fp8-{d}-n{n}-r{rows}-res_{kind}-{quant}" + ("-hugew" if weight == "huge" else "")


def _f32(scale: Optional[float]) -> Optional[float]:
    """A static scale as the float32 value the case stores (None stays None)."""
    return None if scale is None else float(np.float32(scale))


def case_specs() -> List[Fp8Spec]:
    """PLAN's cases for each dtype in turn, then EXTRA's."""
    specs = []
    k = 0  # outputs, eps and the rows' patterns go round with it
    for d in DTYPES:
        kinds = ("none", "float32") if d == "float32" else ("none", "same", "float32")
        for i, (n, rows, scale, group) in enumerate(PLAN):
            kind = kinds[i % len(kinds)]
            pats = _patterns(rows, k)
            specs.append(Fp8Spec(_name(d, n, len(pats), kind, scale, group, "random"), d, n, kind, pats, "random",
                                 1e-5 if k % 3 == 1 else 1e-6, OUTPUT_SETS[(i + DTYPES.index(d)) % 2],
                                 OUT_DTYPE, _f32(scale), group))
            k += 1
    for j, (d, n, rows, kind, scale, group, weight) in enumerate(EXTRA):
        pats = _patterns(rows, k + j) if weight == "random" else tuple(("normal", "spread", "outliers")[r % 3]
                                                                         for r in range(rows))
        specs.append(Fp8Spec(_name(d, n, rows, kind, scale, group, weight), d, n, kind, pats, weight, 1e-6,
                             OUTPUT_SETS[j % 2], OUT_DTYPE, _f32(scale), group))
    return specs


def _row(rng: np.random.Generator, pattern: str, n: int, dtype: str) -> np.ndarray:
    """One float64 row: FP8_PATTERNS here, forward's patterns from forward.pattern_row."""
    sign = rng.choice([-1.0, 1.0], n)
    if pattern == "zero_groups":
        row = rng.standard_normal(n)
        group = np.arange(n) // 64
        zero = (group % 3 == 1) if n >= 128 else (np.arange(n) >= n // 2)
        row[zero] = sign[zero] * 0.0
        return row
    if pattern == "signed_zeros":
        return sign * 0.0
    if pattern == "spread":
        return sign * np.exp2(rng.uniform(-14, 0, n))
    return forward.pattern_row(rng, pattern, n, dtype)


def _weight(rng: np.random.Generator, kind: str, n: int, dtype: str) -> np.ndarray:
    w = forward.random_weight(rng, n, dtype)
    if kind == "huge":
        w = w.copy()
        w[HUGE_COLUMNS] = forward.as_dtype(np.array(2.0**127), dtype)
    return w


def generate_case(spec: Fp8Spec) -> Fp8Case:
    """Inputs from a generator seeded by the case name; expected outputs from the reference."""
    rng = np.random.default_rng(zlib.crc32(spec.name.encode()))
    d, n = spec.dtype, spec.n
    x = forward.pattern_rows(rng, spec.patterns, n, d, d, row=_row)
    if spec.weight == "huge":
        x[0::2, HUGE_COLUMNS] = forward.as_dtype(np.where(x[0::2, HUGE_COLUMNS] < 0, -4.0, 4.0), d)
    weight = _weight(rng, spec.weight, n, d)
    r_dtype = forward.residual_dtype(d, spec.residual)
    residual = None if r_dtype is None else forward.pattern_rows(rng, spec.patterns, n, d, r_dtype, row=_row)
    # The scale's shape alternates between () and (1,) with the case's name.
    scale = None
    if spec.scale is not None:
        scale = np.array(spec.scale, np.float32).reshape(() if zlib.crc32(spec.name.encode()) % 2 else (1,))
    case = Fp8Case(spec, x, weight, residual, scale, {}, {}, None)
    for mode, offset in spec.outputs:
        result = reference.rms_norm(x, weight, spec.eps, residual, mode=mode, weight_offset=offset,
                                    **case.quantization())
        result = result if isinstance(result, tuple) else (result,)
        case.out[(mode, offset)] = result[0]
        if spec.group_size is not None:
            case.scales[(mode, offset)] = result[1]
        if residual is not None:
            case.new_residual = result[-1]
    return case


def arrays(case: Fp8Case) -> Dict[str, np.ndarray]:
    """Every array of a case by its zip entry name."""
    stored = {"x": case.x, "weight": case.weight, "residual": case.residual, "scale": case.scale,
              "new_residual": case.new_residual}
    stored = {k: v for k, v in stored.items() if v is not None}
    for pair, out in case.out.items():
        stored[output_key("out", *pair)] = out
    for pair, scales in case.scales.items():
        stored[output_key("scales", *pair)] = scales
    return stored


def case_from(entry: dict, stored: Dict[str, np.ndarray]) -> Fp8Case:
    """A case from its manifest entry and the arrays read from its zip."""
    fields = {f.name: entry[f.name] for f in dataclasses.fields(Fp8Spec)}
    spec = Fp8Spec(**{**fields, "patterns": tuple(fields["patterns"]),
                      "outputs": tuple((m, float(o)) for m, o in fields["outputs"])})
    out = {pair: stored[output_key("out", *pair)] for pair in spec.outputs}
    scales = ({pair: stored[output_key("scales", *pair)] for pair in spec.outputs}
              if spec.group_size is not None else {})
    return Fp8Case(spec, stored["x"], stored["weight"], stored.get("residual"), stored.get("scale"), out, scales,
                   stored.get("new_residual"))

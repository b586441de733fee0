"""The golden corpus's backward cases: inputs, gradients of the outputs and expected gradients.

They live beside the forward cases in `tests/golden/`, in the same format (bridge.golden writes,
checks and loads both); the manifest lists them under "backward_cases" with "kind": "backward".
Expected bits come from `bridge.reference.rms_norm_backward` only. The corpus is kept small
(long rows get 1-3 rows) because the kernel suites run it through the Triton interpreter and
Pallas interpret mode.
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

# (residual kind, grad_new_residual stored): absent means None, which counts as zeros (NUMERICS.md B6).
VARIANTS = (("none", False), ("same", False), ("same", True), ("float32", False), ("float32", True))
# (n, variants per dtype, row counts taken in turn, dtypes). Short rows: every variant, and row
# counts that are not powers of two, so that the row tree's +0.0 padding matters (65 and 100 pad
# with several power-of-two blocks). From n = 1000 on: one or two variants per dtype of 1-7 rows,
# 16384 for two dtypes and 65536 for one: the kernel suites run the corpus through interpreters.
PLAN = ((1, 5, (100, 65, 33, 7), DTYPES), (3, 5, (65, 100, 33, 7), DTYPES), (127, 5, (7, 33, 3, 65, 3), DTYPES),
        (128, 5, (7, 3), DTYPES), (129, 5, (33, 7, 3), DTYPES), (1000, 2, (3, 7), DTYPES), (4096, 1, (3,), DTYPES),
        (5120, 1, (1,), DTYPES), (8192, 1, (1,), DTYPES), (16384, 1, (1,), ("float32", "float16")),
        (65536, 1, (1,), ("bfloat16",)))
SIZES = tuple(n for n, *_ in PLAN)
# Gradient patterns (grad_out and grad_new_residual), taken in turn by the rows of a case: signed
# zeros give -0.0 leaves and -0.0 dv. Seven, prime to x's eight or nine, so that every pair meets.
G_PATTERNS = ("normal", "zeros", "signed_zeros", "huge", "tiny", "inf", "nan")
# One-row cases take their gradient pattern in turn from these; the longest rows (several chunks
# in a kernel) get "mixed": a normal body with large entries and a stretch of signed zeros.
SINGLE_ROW_G = ("normal", "signed_zeros", "huge", "tiny", "mixed")


# Signs the patterns above leave to chance: grad_out all -0.0 on positive x and weights, so every b
# and p leaf is -0.0. At a power-of-two width and row count the trees' roots are then -0.0 (a sum
# that starts from +0.0 gives +0.0 and flips grad_x's zeros); with masked columns and a negative
# offset a masked a = 0 * offset is -0.0, where the padding must be +0.0 (the root then +0.0).
# (dtype, n, rows, residual kind, grad_new_residual stored); outputs EDGE_OUTPUTS.
EDGE_CASES = (("float32", 128, 4, "none", False), ("bfloat16", 100, 3, "none", False),
              ("float16", 20000, 1, "none", False), ("bfloat16", 4096, 2, "float32", True))
EDGE_OUTPUTS = (("fp32", -0.5), ("llama", 0.0))


@dataclasses.dataclass(frozen=True)
class BackwardSpec:
    name: str
    dtype: str  # D
    n: int
    residual: str  # "none", "same" (D) or "float32"
    grad_new_residual: bool  # stored, or absent (None)
    x_patterns: Tuple[str, ...]  # one per row (forward.PATTERNS), for x and the residual
    g_patterns: Tuple[str, ...]  # one per row (G_PATTERNS), for grad_out and grad_new_residual
    eps: float
    outputs: Tuple[Tuple[str, float], ...]  # the (mode, weight_offset) pairs stored


@dataclasses.dataclass
class BackwardCase:
    """One backward case, as the reference test and the kernel suites use it.

    - spec: the BackwardSpec it was generated from (dtype D, n, residual kind, patterns, eps).
    - x: (rows, n) in D. weight: (n,) in D. grad_out: the gradient of out, (rows, n) in D.
    - residual: (rows, n) in R (D or float32), or None for a case without a residual.
    - grad_new_residual: the gradient of the new residual, (rows, n) in R, or None: absent,
      which the contract counts as zeros (pass None to the backend; zeros give the same bits).
    - expected: (mode, weight_offset) -> what `reference.rms_norm_backward` returns for them:
      (grad_x, grad_weight), or (grad_x, grad_residual, grad_weight) with a residual; grad_x in D
      and x's shape, grad_residual in R, grad_weight (n,) in D.
    """

    spec: BackwardSpec
    x: np.ndarray
    weight: np.ndarray
    grad_out: np.ndarray
    residual: Optional[np.ndarray]
    grad_new_residual: Optional[np.ndarray]
    expected: Dict[Tuple[str, float], Tuple[np.ndarray, ...]]


def output_names(has_residual: bool) -> Tuple[str, ...]:
    """The names of rms_norm_backward's outputs, in the order it returns them."""
    return ("grad_x", "grad_residual", "grad_weight") if has_residual else ("grad_x", "grad_weight")


def _patterns(n: int, rows: int, k: int) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(x patterns, g patterns) of case k: every pair of patterns meets in the cases of 63+ rows."""
    if rows == 1:
        return ("mixed",), ("mixed" if n >= 16384 else SINGLE_ROW_G[k % len(SINGLE_ROW_G)],)
    # A NaN in x makes its row's every p NaN, hence all of grad_weight: one case in four has one.
    xs = forward.PATTERNS if k % 4 == 3 else tuple(p for p in forward.PATTERNS if p != "nan")
    if rows <= 3 and k % 3 == 0:
        # Every leaf a signed zero: some grad_weight columns have only -0.0 leaves (2^-rows of them),
        # whose tree is -0.0 only without padding, +0.0 with it.
        return tuple(xs[(k + r) % len(xs)] for r in range(rows)), ("signed_zeros",) * rows
    return tuple(xs[(k + r) % len(xs)] for r in range(rows)), tuple(G_PATTERNS[(k + r) % len(G_PATTERNS)]
                                                                     for r in range(rows))


def case_specs() -> List[BackwardSpec]:
    """The backward corpus, PLAN's cases for each dtype in turn."""
    specs = []
    for d in DTYPES:
        variants = tuple(v for v in VARIANTS if not (d == "float32" and v[0] == "same"))  # same is float32
        k = 0  # the case's index within its dtype: rows, eps and outputs go round with it
        for i, (n, count, row_counts, dtypes) in enumerate(PLAN):
            if d not in dtypes:
                continue
            for j in range(min(count, len(variants))):
                kind, has_gr = variants[(i + j) % len(variants)]
                rows = row_counts[k % len(row_counts)]
                xs, gs = _patterns(n, rows, k + DTYPES.index(d))  # dtypes differ
                name = f"bwd-{d}-n{n}-r{rows}-res_{kind}" + ("-gr" if has_gr else "")
                specs.append(BackwardSpec(name, d, n, kind, has_gr, xs, gs, 1e-5 if k % 3 == 1 else 1e-6,
                                          OUTPUT_SETS[k % 2]))
                k += 1
    for d, n, rows, kind, has_gr in EDGE_CASES:
        name = f"bwd-{d}-n{n}-r{rows}-res_{kind}" + ("-gr" if has_gr else "") + "-signs"
        specs.append(BackwardSpec(name, d, n, kind, has_gr, ("positive",) * rows, ("negative_zeros",) * rows, 1e-6,
                                  EDGE_OUTPUTS))
    return specs


def _g_row(rng: np.random.Generator, pattern: str, n: int, dtype: str) -> np.ndarray:
    """One float64 gradient row of the named pattern, scaled to the range of `dtype`."""
    f16 = dtype == "float16"
    sign = rng.choice([-1.0, 1.0], n)
    if pattern == "signed_zeros":
        return sign * 0.0
    if pattern == "negative_zeros":
        return np.full(n, -0.0)
    if pattern == "huge":  # float32/bfloat16: a * xhat and the row tree can overflow; float16: grad_x can
        return sign * np.exp2(rng.uniform(14, 15.9, n) if f16 else rng.uniform(64, 126, n))
    if pattern == "tiny":  # D's subnormals and below: products underflow
        return sign * np.exp2(rng.uniform(-24, -14, n) if f16 else rng.uniform(-140, -120, n))
    if pattern == "mixed":
        row = rng.standard_normal(n)
        row[rng.integers(0, n, max(1, n // 256))] *= 2.0**10 if f16 else 2.0**40
        start = int(rng.integers(0, max(1, n - n // 8)))
        row[start:start + n // 8] = sign[start:start + n // 8] * 0.0
        return row
    return forward.pattern_row(rng, pattern, n, dtype)  # normal, zeros, inf, nan: as x's rows


def _x_row(rng: np.random.Generator, pattern: str, n: int, dtype: str) -> np.ndarray:
    """One float64 row of x (or the residual): forward's patterns, and "positive" (|normal| + 0.1)."""
    return (np.abs(rng.standard_normal(n)) + 0.1 if pattern == "positive"
            else forward.pattern_row(rng, pattern, n, dtype))


def generate_case(spec: BackwardSpec) -> BackwardCase:
    """Inputs from a generator seeded by the case name; expected gradients from the reference."""
    rng = np.random.default_rng(zlib.crc32(spec.name.encode()))
    d, n = spec.dtype, spec.n
    x = forward.pattern_rows(rng, spec.x_patterns, n, d, d, row=_x_row)
    weight = forward.random_weight(rng, n, d)
    if "positive" in spec.x_patterns:
        # w + offset >= +0.0 for EDGE_OUTPUTS' offsets (the -0.0 weight becomes exactly 0.5): every
        # a = -0.0 * w is -0.0.
        weight = forward.as_dtype(np.abs(weight.astype(np.float64)) + 0.5, d)
    grad_out = forward.pattern_rows(rng, spec.g_patterns, n, d, d, row=_g_row)
    r_dtype = forward.residual_dtype(d, spec.residual)
    residual = grad_new_residual = None
    if r_dtype is not None:
        residual = forward.pattern_rows(rng, spec.x_patterns, n, d, r_dtype, row=_x_row)
        if spec.grad_new_residual:
            grad_new_residual = forward.pattern_rows(rng, spec.g_patterns, n, d, r_dtype, row=_g_row)
    expected = {(mode, offset): reference.rms_norm_backward(x, weight, grad_out, spec.eps, residual, grad_new_residual,
                                                            mode=mode, weight_offset=offset)
                for mode, offset in spec.outputs}
    return BackwardCase(spec, x, weight, grad_out, residual, grad_new_residual, expected)


def arrays(case: BackwardCase) -> Dict[str, np.ndarray]:
    """Every array of a case by its zip entry name."""
    stored = {"x": case.x, "weight": case.weight, "grad_out": case.grad_out, "residual": case.residual,
              "grad_new_residual": case.grad_new_residual}
    stored = {k: v for k, v in stored.items() if v is not None}
    for (mode, offset), outputs in case.expected.items():
        for what, a in zip(output_names(case.residual is not None), outputs):
            stored[output_key(what, mode, offset)] = a
    return stored


def case_from(entry: dict, stored: Dict[str, np.ndarray]) -> BackwardCase:
    """A case from its manifest entry and the arrays read from its zip."""
    fields = {f.name: entry[f.name] for f in dataclasses.fields(BackwardSpec)}
    spec = BackwardSpec(**{**fields, "x_patterns": tuple(fields["x_patterns"]),
                           "g_patterns": tuple(fields["g_patterns"]),
                           "outputs": tuple((m, float(o)) for m, o in fields["outputs"])})
    names = output_names("residual" in stored)
    expected = {pair: tuple(stored[output_key(what, *pair)] for what in names) for pair in spec.outputs}
    return BackwardCase(spec, stored["x"], stored["weight"], stored["grad_out"], stored.get("residual"),
                        stored.get("grad_new_residual"), expected)

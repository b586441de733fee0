"""Helpers for bi_torch's FP8 output tests (contract v1.2): the reference over any leading shape,
bi_torch's calls in one tuple form, bitwise comparison of FP8 codes, and FP8 row patterns.

FP8 arrays are compared as their uint8 codes (bridge.verify.compare works on 16- and 32-bit floats);
scales and new residuals go through torch_helpers.assert_bits. Shared by test_torch_fp8_cpu.py,
test_torch_fp8_rows_cpu.py, test_torch_fp8_api_cpu.py and test_torch_fp8_gpu.py (the same inputs and
float32 patterns on all).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

import bi_torch
from bridge import reference
from bridge.numerics import reference_fp8
from bridge.numerics.reference_fp8 import fp8_numpy_dtype
from torch_helpers import DTYPES, NUMPY_DTYPES, assert_bits, random_rows, random_weight, seeded_rng, to_torch

FP8 = "float8_e4m3fn"
TORCH_FP8 = torch.float8_e4m3fn
# (id, static scale or None, group size or None)
QUANTS = (("static", 0.0123, None), ("g64", None, 64), ("g128", None, 128))
RESIDUALS = ("none", "same", "float32")
# float32's same-dtype residual is its float32 residual.
DTYPE_RESIDUALS = [(d, k) for d in DTYPES for k in RESIDUALS if not (d == "float32" and k == "same")]


def fp8_codes(a) -> np.ndarray:
    """The uint8 codes of an FP8 torch tensor or ml_dtypes array."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == TORCH_FP8, f"dtype {a.dtype}, expected {TORCH_FP8}"
        return a.detach().cpu().contiguous().view(torch.uint8).numpy()
    assert a.dtype == fp8_numpy_dtype(FP8), f"dtype {a.dtype}, expected {FP8}"
    return np.ascontiguousarray(a).view(np.uint8)


def assert_fp8_bits(expected, actual, what: str = "") -> None:
    """Bitwise equality of FP8 outputs (numpy or torch); the first differing index is reported."""
    e, a = fp8_codes(expected), fp8_codes(actual)
    assert e.shape == a.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    diff = np.flatnonzero(e.ravel() != a.ravel())
    if diff.size:
        i = int(diff[0])
        where = tuple(int(k) for k in np.unravel_index(i, e.shape))
        value = lambda c: np.array([c], np.uint8).view(fp8_numpy_dtype(FP8))[0]  # noqa: E731
        raise AssertionError(f"{what}: {diff.size} of {e.size} FP8 codes differ; first at index {where}: got "
                             f"0x{a.ravel()[i]:02x} ({value(a.ravel()[i])}), expected 0x{e.ravel()[i]:02x} "
                             f"({value(e.ravel()[i])})")


def scale_array(scale: Optional[float], shape=()) -> Optional[np.ndarray]:
    return None if scale is None else np.array(scale, np.float32).reshape(shape)


def ref_fp8(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6, residual: Optional[np.ndarray] = None,
            mode: str = "llama", weight_offset: float = 0.0, scale: Optional[np.ndarray] = None,
            group_size: Optional[int] = None) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """reference.rms_norm's FP8 output over any leading shape, as (out, scales or None, new_residual or None)."""
    n = x.shape[-1]
    flat = lambda a: None if a is None else a.reshape(-1, n)  # noqa: E731
    result = reference.rms_norm(flat(x), weight, eps, flat(residual), mode=mode, weight_offset=weight_offset,
                                out_dtype=FP8, scale=scale, group_size=group_size)
    result = result if isinstance(result, tuple) else (result,)
    out = result[0].reshape(x.shape)
    scales = result[1].reshape(x.shape[:-1] + (n // group_size,)) if group_size else None
    new_residual = result[-1].reshape(x.shape) if residual is not None else None
    return out, scales, new_residual


def bi_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: Optional[torch.Tensor] = None,
           mode: str = "llama", weight_offset: float = 0.0, scale=None, group_size: Optional[int] = None
           ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """bi_torch.rms_norm with an FP8 out_dtype, as (out, scales or None, new_residual or None); the
    returned tuple's shape is checked against the spec's."""
    result = bi_torch.rms_norm(x, weight, eps, residual, mode=mode, weight_offset=weight_offset, out_dtype=TORCH_FP8,
                               scale=scale, group_size=group_size)
    expected_len = 1 + (group_size is not None) + (residual is not None)
    if expected_len == 1:
        assert isinstance(result, torch.Tensor)
        return result, None, None
    assert isinstance(result, tuple) and len(result) == expected_len
    return result[0], result[1] if group_size else None, result[-1] if residual is not None else None


def check_fp8(expected, actual, what: str) -> None:
    """(out, scales, new_residual) of ref_fp8 against bi_fp8's, bit for bit (None must match None)."""
    for name, e, a in zip(("out", "scales", "new_residual"), expected, actual):
        assert (e is None) == (a is None), f"{what}: {name}"
        if e is None:
            continue
        if name == "out":
            assert_fp8_bits(e, a, f"{what}: out")
        else:
            assert a.dtype == bi_torch.torch_dtype(reference.dtype_name(e.dtype)), f"{what}: {name} dtype"
            assert_bits(e, a, f"{what}: {name}")


def fp8_rows(rng: np.random.Generator, rows: int, n: int, dtype: str) -> np.ndarray:
    """Rows that reach FP8's special cases after normalisation: zero groups (of 64), signed zeros,
    magnitudes spread over 2**-14..2**4 (FP8 subnormals next to a group's amax), NaN, inf, huge
    outliers (saturation with a static scale), and normal rows."""
    out = np.empty((rows, n))
    for r in range(rows):
        sign = rng.choice([-1.0, 1.0], n)
        kind = r % 7
        row = rng.standard_normal(n)
        if kind == 0:
            zero = (np.arange(n) // 64) % 2 == 1
            row[zero] = sign[zero] * 0.0
        elif kind == 1:
            row = sign * 0.0
        elif kind == 2:
            row = sign * np.exp2(rng.uniform(-14, 4, n))
        elif kind == 3:
            row[rng.integers(0, n)] = np.nan
        elif kind == 4:
            row[rng.integers(0, n)] = np.inf * sign[0]
        elif kind == 5:
            row[rng.integers(0, n, 3)] *= 1e3
        out[r] = row
    with np.errstate(over="ignore"):
        return out.astype(np.float32).astype(NUMPY_DTYPES[dtype])


def fp8_inputs(tag, rows: int, n: int, dtype: str, res_kind: str, special: bool = True):
    """numpy (x, weight, residual or None): fp8_rows (or random_rows), res_kind "none", "same" or "float32"."""
    rng = seeded_rng(tag, rows, n, dtype, res_kind)
    x = fp8_rows(rng, rows, n, dtype) if special else random_rows(rng, (rows, n), dtype)
    r_dtype = None if res_kind == "none" else dtype if res_kind == "same" else "float32"
    r = None if r_dtype is None else random_rows(rng, (rows, n), r_dtype)
    return x, random_weight(rng, n, dtype), r


def fp8_patterns() -> np.ndarray:
    """Every FP8 value's neighbourhood (+-3 ulps of float32 around each value and each midpoint between
    two neighbours, both signs), a stride-4099 sweep of all 2**32 patterns, and the special values."""
    codes = np.arange(0x7F, dtype=np.uint8).view(reference_fp8.fp8_numpy_dtype(FP8)).astype(np.float32)
    mids = (codes[:-1].astype(np.float64) + codes[1:]) / 2
    centres = np.concatenate([codes, mids.astype(np.float32), [448.0 + 16.0, 480.0]]).astype(np.float32)
    near = (centres.view(np.int32)[:, None] + np.arange(-3, 4)).clip(0).astype(np.int32).view(np.float32).ravel()
    sweep = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 2.0**-10, 2.0**-9 * 0.5,
                        2.0**-6, 3e38], np.float32)
    return np.concatenate([near, -near, sweep, special]).astype(np.float32)


def check_fp8_corpus_case(case, name: str, device: str = "cpu") -> None:
    """Every (mode, offset) output of an FP8 golden case through bi_torch on `device`, bit for bit."""
    x, w, r = (to_torch(a, device) for a in (case.x, case.weight, case.residual))
    scale = None if case.scale is None else torch.from_numpy(case.scale.copy()).to(device)
    for (mode, offset), expected_out in case.out.items():
        expected = (expected_out, case.scales.get((mode, offset)), case.new_residual)
        got = bi_fp8(x, w, case.spec.eps, r, mode, offset, scale=scale, group_size=case.spec.group_size)
        assert got[0].device.type == torch.device(device).type
        check_fp8(expected, tuple(None if t is None else t.cpu() for t in got), f"{name} ({mode}, offset {offset})")
    assert_bits(case.x, x.cpu(), f"{name}: x was modified")

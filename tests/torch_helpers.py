"""Shared helpers for the bi_torch tests: numpy <-> torch through bit patterns, random rows, references.

Every conversion goes through the raw bits (int16/int32 views), so no value is ever rounded,
NaN payloads and signed zeros included, and bfloat16 needs no float conversion on either side.
"""

from __future__ import annotations

import zlib
from typing import Optional, Tuple

import numpy as np
import pytest
import torch

import bi_torch
from bridge import reference
from bridge.numerics import tiling
from bridge.verify.compare import assert_bitwise_equal

DTYPES = ("float32", "bfloat16", "float16")
NUMPY_DTYPES = {name: reference.numpy_dtype(name) for name in ("float32", "bfloat16", "float16")}
_SIGNED_TORCH = {2: torch.int16, 4: torch.int32}


def to_torch(a: Optional[np.ndarray], device="cpu") -> Optional[torch.Tensor]:
    """A torch tensor with exactly a's bits (a copy; contiguous), on `device`."""
    return None if a is None else bi_torch.from_numpy(a, device)


def to_numpy(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """A numpy array (bfloat16 as ml_dtypes.bfloat16) with exactly t's bits."""
    return None if t is None else bi_torch.to_numpy(t)


def int_view(t: torch.Tensor) -> torch.Tensor:
    """t's bits as a same-shaped integer tensor (works on any strides, on any device)."""
    return t.view(_SIGNED_TORCH[t.element_size()])


def assert_bits(expected, actual, what: str = "") -> None:
    """Bitwise equality of numpy arrays or torch tensors (any mix); the first difference is reported."""
    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        if (expected.shape == actual.shape and expected.dtype == actual.dtype
                and expected.device == actual.device and torch.equal(int_view(expected), int_view(actual))):
            return  # fast path (on the GPU, no copy); details come from the numpy comparison below
    e = to_numpy(expected) if isinstance(expected, torch.Tensor) else expected
    a = to_numpy(actual) if isinstance(actual, torch.Tensor) else actual
    assert_bitwise_equal(e, a, what)


def random_rows(rng: np.random.Generator, shape, dtype: str, *, specials: bool = False) -> np.ndarray:
    """Normal values with a per-row scale; with `specials`, a few zeros, infs, NaNs and huge/tiny values."""
    shape = tuple(shape)
    scale = np.exp2(rng.uniform(-4, 4, shape[:-1] + (1,)))
    v = rng.standard_normal(shape) * scale
    if specials and v.size:
        flat = v.reshape(-1)
        k = max(1, flat.size // 50)
        idx = rng.integers(0, flat.size, k)
        choices = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e4, -3e4, 1e-6, 6e-8])
        flat[idx] = rng.choice(choices, k)
    with np.errstate(over="ignore"):
        return v.astype(np.float32).astype(NUMPY_DTYPES[dtype])


def random_weight(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    w = 1.0 + 0.25 * rng.standard_normal(n)
    return w.astype(np.float32).astype(NUMPY_DTYPES[dtype])


def ref(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6, residual: Optional[np.ndarray] = None,
        mode: str = "llama", weight_offset: float = 0.0) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """bridge.reference.rms_norm over any leading shape, always as (out, new_residual or None)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    r2 = None if residual is None else residual.reshape(-1, n)
    result = reference.rms_norm(x2, weight, eps, r2, mode=mode, weight_offset=weight_offset)
    if residual is None:
        return result.reshape(x.shape), None
    out, new_res = result
    return out.reshape(x.shape), new_res.reshape(x.shape)


def bi(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: Optional[torch.Tensor] = None,
       mode: str = "llama", weight_offset: float = 0.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """bi_torch.rms_norm, always as (out, new_residual or None)."""
    result = bi_torch.rms_norm(x, weight, eps, residual, mode=mode, weight_offset=weight_offset)
    if residual is None:
        return result, None
    return result


def ref_backward(x: np.ndarray, weight: np.ndarray, grad_out: np.ndarray, eps: float = 1e-6,
                 residual: Optional[np.ndarray] = None, grad_new_residual: Optional[np.ndarray] = None,
                 mode: str = "llama", weight_offset: float = 0.0
                 ) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """bridge.reference.rms_norm_backward over any leading shape, as (grad_x, grad_residual or None, grad_weight)."""
    n = x.shape[-1]

    def flat(a):
        return None if a is None else a.reshape(-1, n)

    result = reference.rms_norm_backward(flat(x), weight, flat(grad_out), eps, flat(residual), flat(grad_new_residual),
                                         mode=mode, weight_offset=weight_offset)
    grad_x, grad_residual, grad_weight = result if residual is not None else (result[0], None, result[1])
    return grad_x.reshape(x.shape), None if grad_residual is None else grad_residual.reshape(x.shape), grad_weight


def bi_backward(x: torch.Tensor, weight: torch.Tensor, grad_out: Optional[torch.Tensor], eps: float = 1e-6,
                residual: Optional[torch.Tensor] = None, grad_new_residual: Optional[torch.Tensor] = None,
                mode: str = "llama", weight_offset: float = 0.0, fn=None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Gradients of bi_torch.rms_norm (or fn, same signature) through torch.autograd.grad, as
    (grad_x, grad_residual or None, grad_weight). The inputs become leaves on their own memory and
    strides. An output whose gradient is None is left out of autograd.grad, so its gradient
    reaches the backward as None (unused), not as zeros."""
    fn = fn or bi_torch.rms_norm
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    leaves = (x, weight) if residual is None else (x, residual.detach().requires_grad_(), weight)
    result = fn(x, weight, eps, None if residual is None else leaves[1], mode=mode, weight_offset=weight_offset)
    outputs = (result,) if residual is None else result
    pairs = [(o, g) for o, g in zip(outputs, (grad_out, grad_new_residual)) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs])
    return (grads[0], None, grads[1]) if residual is None else grads


def seeded_rng(*parts) -> np.random.Generator:
    """A generator seeded from a test's parameters (hash() of str is salted per process)."""
    return np.random.default_rng(zlib.crc32("|".join(str(p) for p in parts).encode()))


def backward_inputs(rng: np.random.Generator, shape, dtype: str, res_kind: Optional[str], with_gr: bool,
                    specials: bool = False) -> Tuple[Optional[np.ndarray], ...]:
    """numpy (x, weight, grad_out, residual or None, grad_new_residual or None); res_kind is None,
    "same" (x's dtype) or "float32"; with_gr: whether the new residual gets a gradient."""
    r_dtype = None if res_kind is None else dtype if res_kind == "same" else "float32"
    x, g = random_rows(rng, shape, dtype, specials=specials), random_rows(rng, shape, dtype, specials=specials)
    r = None if r_dtype is None else random_rows(rng, shape, r_dtype, specials=specials)
    g_r = random_rows(rng, shape, r_dtype) if with_gr else None
    return x, random_weight(rng, shape[-1], dtype), g, r, g_r


def check_backward(args, eps: float, mode: str, offset: float, what: str, device="cpu", **kw
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Autograd's gradients of one call (backward_inputs' numpy arrays, run on `device`) against
    the reference, bit for bit; returns them (torch). kw goes to bi_backward (fn=...)."""
    expected = ref_backward(*args[:3], eps, *args[3:], mode, offset)
    x, w, g, r, g_r = (to_torch(a, device) for a in args)
    got = bi_backward(x, w, g, eps, r, g_r, mode, offset, **kw)
    for name, e, a in zip(("grad_x", "grad_residual", "grad_weight"), expected, got):
        assert (e is None) == (a is None), f"{what}: {name}"
        if e is not None:
            assert_bits(e, a, f"{what}: {name}")
    return got


# Launch configurations of the backward, as overrides of tiling's tuning constants (which
# backward_config and column_tree_width read at call time): the default; whole rows (no slabs) with
# few rows per tile, many steps per block, narrow long-row tiles and a narrow column tree of many
# levels; one program's block as large as the counter allows (a single block, the kernel's FINAL
# path, for small batches); slabs of a few columns for any batch, and narrower long-row tiles.
NO_SLABS = {"SLAB_MIN_ROWS": 1 << 40}
BACKWARD_CONFIGS = ({}, {"BACKWARD_TILE_BYTES": 512, "BACKWARD_PROGRAMS": 4, "COLUMN_TREE_GROUP": 2, "COLUMN_TREE_TILE": 64,
                         "BACKWARD_LONG_CHUNK": 1024, **NO_SLABS},
                    {"BACKWARD_PROGRAMS": 1, "MAX_BACKWARD_LEVELS": 6, "COUNTER_REGISTERS": 1 << 20, "BACKWARD_TILE_ROWS": 16,
                     **NO_SLABS},
                    {"SLAB_MIN_ROWS": 1, "SLAB_MAX_ROWS": 1 << 40, "SLAB_ROW_BYTES": 8, "SLAB_TILE": 64,
                     "BACKWARD_LONG_CHUNK": 2048})


def patch_backward_config(patch: pytest.MonkeyPatch, overrides: dict) -> None:
    """Apply one of BACKWARD_CONFIGS with a monkeypatch (or one of its contexts)."""
    for name, value in overrides.items():
        patch.setattr(tiling, name, value)


def warm_up(fn) -> None:
    """Run fn on a side stream before a CUDA-graph capture (compiles the kernel; no allocation inside
    the capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()

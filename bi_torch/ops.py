"""bi_torch's public functions: validation, then one `torch.library` custom op per variant.

The custom ops give torch.compile(fullgraph=True) an opaque node with a fake implementation
(no graph breaks) and keep CUDA-graph capture free of host synchronisation: validation reads
only shapes, dtypes, strides and devices.

Which calls train: `rms_norm` (with or without a residual) and `rms_norm_batch_invariant` without a
residual (it is `rms_norm(mode="fp32")`, out of place) differentiate w.r.t. x, weight and residual
(bi_torch/autograd.py, NUMERICS.md's backward). The in-place calls, `fused_add_rms_norm_` and
`rms_norm_batch_invariant` with a residual, overwrite what a backward would need: inference only,
they raise RuntimeError when grad mode is on and a tensor requires grad.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple, Union

import numpy as np
import torch

from bridge.numerics import reference
from bridge.numerics.contract import check_rms_norm_args
from bridge.numerics.reference_fp8 import fp8_numpy_dtype

from .fp8 import FP8_DTYPES, TORCH_FP8, check_fp8, rms_norm_fp8
from .launch import launch
from .rows import DTYPE_NAMES, as_rows, dtype_name, rows_overlap, torch_dtype


class InterpreterWarning(UserWarning):
    """CPU tensors reached bi_torch on a machine with a CUDA GPU: they run under the Triton interpreter."""


_warned_cpu = False  # the InterpreterWarning is given once per process


def from_numpy(a: np.ndarray, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """A new tensor with exactly a's bits (bfloat16 as ml_dtypes.bfloat16, FP8 as ml_dtypes' float8
    types), through an integer view.

    torch has no ml_dtypes bfloat16, and an integer view rounds nothing (NaN payloads, -0.0).
    torch.tensor copies into torch's allocator, whose CPU buffers JAX can import without a copy.
    """
    if a.dtype.itemsize == 1:
        return torch.tensor(np.ascontiguousarray(a).view(np.uint8), device=device).view(TORCH_FP8[a.dtype.name])
    ints = reference.bits(a).view({2: np.int16, 4: np.int32}[a.dtype.itemsize])
    return torch.tensor(ints, device=device).view(torch_dtype(reference.dtype_name(a.dtype)))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A new numpy array (bfloat16 as ml_dtypes.bfloat16, FP8 as ml_dtypes' float8 types) with exactly t's bits."""
    if t.element_size() == 1 and t.dtype in FP8_DTYPES:
        ints = t.detach().cpu().contiguous().view(torch.uint8)
        return ints.numpy().copy().view(fp8_numpy_dtype(FP8_DTYPES[t.dtype]))
    ints = t.detach().cpu().contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])
    return ints.numpy().copy().view(reference.numpy_dtype(dtype_name(t.dtype)))


def _weight_dtype_error(x: torch.Tensor, weight: torch.Tensor) -> TypeError:
    """The contract takes the weight in x's dtype. Mixed dtypes come from float32 norm weights fed
    16-bit activations: torch.autocast over a float32 model, or a model keeping norms in float32."""
    d, w = dtype_name(x.dtype), dtype_name(weight.dtype)
    message = (f"weight: expected dtype {d} (x's dtype); got {w}. bi-norm computes in one dtype: cast the weight, "
               f"weight.to(x.dtype) (differentiable; the bits are then those of the rounded weight), or the module, "
               f"module.to(torch.{d})")
    if torch.is_autocast_enabled(x.device.type):
        message += (f". Under torch.autocast, x arrived in {d} while the weight stayed {w}: autocast does not cast "
                    f"bi-norm's arguments; run the model in one dtype, model.to(torch.{d}), instead of autocast")
    return TypeError(message)


def _warn_cpu_once() -> None:
    global _warned_cpu
    if _warned_cpu or not torch.cuda.is_available():
        return
    _warned_cpu = True
    warnings.warn("x: a CPU tensor, on a machine with a CUDA GPU: bi_torch runs CPU tensors under the Triton "
                  "interpreter, orders of magnitude slower than the GPU (same bits). Move the tensors with .cuda() "
                  "(a model: model.cuda()); to keep CPU tensors and silence this, "
                  "warnings.filterwarnings('ignore', category=bi_torch.InterpreterWarning).",
                  InterpreterWarning, stacklevel=4)


def _validate(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor], mode: str,
              weight_offset: float, inplace: bool) -> None:
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor; got {type(t).__name__}")
    if (weight.dtype != x.dtype and weight.dtype in DTYPE_NAMES and x.dtype in DTYPE_NAMES
            and weight.shape == x.shape[-1:]):
        raise _weight_dtype_error(x, weight)
    check_rms_norm_args(
        x_shape=tuple(x.shape), x_dtype=dtype_name(x.dtype), weight_shape=tuple(weight.shape),
        weight_dtype=dtype_name(weight.dtype), eps=eps,
        residual_shape=None if residual is None else tuple(residual.shape),
        residual_dtype=None if residual is None else dtype_name(residual.dtype),
        mode=mode, weight_offset=weight_offset)
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"x: expected a CUDA tensor (or a CPU tensor, run by the Triton interpreter); got {x.device}")
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        _warn_cpu_once()
    for name, t in (("weight", weight), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (x's device); got {t.device}")
    if weight.dim() == 1 and weight.shape[0] > 1 and weight.stride(0) != 1:
        raise ValueError(f"weight: must be contiguous; got stride {weight.stride(0)}")
    if inplace and torch.is_grad_enabled():
        for name, t in (("x", x), ("residual", residual), ("weight", weight)):
            if t is not None and t.requires_grad:
                raise RuntimeError(
                    f"{name}: requires grad, but the in-place call (fused_add_rms_norm_, or rms_norm_batch_invariant "
                    f"with a residual) overwrites x and residual and has no backward. To train, call "
                    f"bi_torch.rms_norm(x, weight, eps, residual), which returns (out, new_residual) and "
                    f"differentiates; for inference, run under torch.no_grad() or torch.inference_mode().")
    x_rows = as_rows(x, "x")
    if residual is not None:
        r_rows = as_rows(residual, "residual")
    if inplace and residual is not None:
        for name, rows in (("x", x_rows), ("residual", r_rows)):
            if rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]:
                raise ValueError(f"{name}: rows overlap in memory (row stride {rows.stride(0)} < n); "
                                 f"the in-place call cannot write them")
        # Addresses are not traceable; under torch.compile the check runs in eager calls only.
        if not torch.compiler.is_compiling() and rows_overlap(x_rows, r_rows):
            raise ValueError("residual: must not share memory with x in the in-place call")


@torch.library.custom_op("bi_norm::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, norm_mode: str,
                 weight_offset: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launch(as_rows(x, "x"), weight, out.view(-1, x.shape[-1]), eps, None, None, norm_mode, weight_offset)
    return out


@_rms_norm_op.register_fake
def _(x, weight, eps, norm_mode, weight_offset):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("bi_norm::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, norm_mode: str,
                     weight_offset: float) -> Tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    launch(as_rows(x, "x"), weight, out.view(-1, n), eps, as_rows(residual, "residual"), new_residual.view(-1, n),
           norm_mode, weight_offset)
    return out, new_residual


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, norm_mode, weight_offset):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(residual.shape, dtype=residual.dtype, device=residual.device))


@torch.library.custom_op("bi_norm::fused_add_rms_norm_", mutates_args=("x", "residual"))
def _fused_add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           norm_mode: str, weight_offset: float) -> None:
    # The schema says norm_mode: torch.compile's functionalization passes a `mode` of its own.
    x_rows, r_rows = as_rows(x, "x"), as_rows(residual, "residual")
    launch(x_rows, weight, x_rows, eps, r_rows, r_rows, norm_mode, weight_offset)


@_fused_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, norm_mode, weight_offset):
    return None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: Optional[torch.Tensor] = None,
    *,
    mode: str = "llama",
    weight_offset: float = 0.0,
    out_dtype: Optional[torch.dtype] = None,
    scale: Union[torch.Tensor, float, None] = None,
    group_size: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Batch-invariant RMSNorm over the last dimension (NUMERICS.md); inputs are not modified.

    Returns out, or (out, new_residual) when a residual (x's dtype or float32) is given.
    CUDA tensors run the compiled kernel, CPU tensors the same kernel under Triton's interpreter.
    Differentiable w.r.t. x, weight and residual (first order; the gradients of NUMERICS.md's
    backward: grad_residual in the residual's dtype). The forward's bits do not depend on grad mode.

    FP8 output (contract v1.2, bi_torch/fp8.py): out_dtype=torch.float8_e4m3fn with either `scale`
    (static: a float32 tensor of shape () or (1,) on x's device, or a Python float) returning out or
    (out, new_residual), or `group_size` (64 or 128, dividing n: per-token-group scales) returning
    (out, scales) or (out, scales, new_residual), scales float32 of shape x.shape[:-1] + (n // group_size,).
    FP8 outputs have no gradient (RuntimeError if grad mode is on and an input requires grad).
    """
    _validate(x, weight, eps, residual, mode, weight_offset, inplace=False)
    if out_dtype is not None or scale is not None or group_size is not None:
        fmt, scale_t = check_fp8(x, weight, residual, out_dtype, scale, group_size)
        if fmt is not None:
            return rms_norm_fp8(x, weight, eps, residual, mode, weight_offset, fmt, scale_t, group_size)
    if residual is None:
        return torch.ops.bi_norm.rms_norm(x, weight, float(eps), mode, float(weight_offset))
    return torch.ops.bi_norm.add_rms_norm(x, residual, weight, float(eps), mode, float(weight_offset))


def fused_add_rms_norm_(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    mode: str = "llama",
    weight_offset: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """In place, vLLM's convention: x <- normalized output, residual <- x + residual. Returns (x, residual).

    All checks run before the kernel: on any error both tensors are left untouched. Inference only:
    with grad mode on, a tensor that requires grad raises RuntimeError (train with rms_norm).
    """
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual: expected a torch.Tensor; got {type(residual).__name__}")
    _validate(x, weight, eps, residual, mode, weight_offset, inplace=True)
    torch.ops.bi_norm.fused_add_rms_norm_(x, residual, weight, float(eps), mode, float(weight_offset))
    return x, residual


def rms_norm_batch_invariant(
    input: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Drop-in for vLLM's function of this name: mode "fp32" (x*inv*w in float32, as its Triton path).

    Without residual returns a new tensor (and differentiates, as rms_norm); with one it updates
    input and residual in place and returns (input, residual), as vLLM's fused_add_rms_norm path
    does, but batch invariant: inference only, like fused_add_rms_norm_.
    """
    if residual is None:
        return rms_norm(input, weight, eps, mode="fp32")
    return fused_add_rms_norm_(input, residual, weight, eps, mode="fp32")


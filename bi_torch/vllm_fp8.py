"""Drop-ins for vLLM's fused RMSNorm + FP8 quantization, batch invariant (contract v1.2, mode "llama").

Same names, argument order and in-place conventions as vLLM's ops:

- `rms_norm_static_fp8_quant(result, input, weight, scale, epsilon)` (torch.ops._C): writes FP8
  into `result`, returns None.
- `fused_add_rms_norm_static_fp8_quant(result, input, residual, weight, scale, epsilon)`
  (torch.ops._C): residual <- input + residual in place, FP8 of its norm into `result`; input is
  not modified. Returns None.
- `rms_norm_per_block_quant(input, weight, epsilon, quant_dtype, group_size, scale_ub=None,
  residual=None, is_scale_transposed=False)` (vllm._custom_ops): returns (output, scales), scales
  float32 (tokens, n // group_size[1]) (with is_scale_transposed, that shape over a column-major
  buffer, as vLLM's); a residual is updated in place.

The bits are the contract's (NUMERICS.md, FP8 output; README "vLLM" says where they differ from
vLLM's kernels). Inference only: with grad mode on, an input that requires grad raises.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from bridge.numerics.contract import FP8_FORMATS

from . import fp8
from .ops import _validate
from .rows import as_rows, dtype_name, rows_overlap


def _check_fp8_dtype(dtype: object, what: str) -> None:
    if dtype not in fp8.TORCH_FP8.values():
        name = type(dtype).__name__
        if isinstance(dtype, torch.dtype):
            name = fp8.FP8_DTYPES.get(dtype) or dtype_name(dtype)
        error = ValueError if name in fp8.FP8_DTYPES.values() else TypeError
        raise error(f"{what}: expected {', '.join(f'torch.{n}' for n in FP8_FORMATS)} (contract v1.2); got {name}")


def _check_writes(x: torch.Tensor, written: Sequence[Tuple[str, torch.Tensor]]) -> None:
    """Tensors the call writes: each on x's device, rows that do not overlap each other, memory not
    shared with x or with one another (addresses are checked in eager calls only)."""
    rows = [("x", as_rows(x, "x"))]
    for name, t in written:
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (x's device); got {t.device}")
        r = as_rows(t, name)
        if r.shape[0] > 1 and r.stride(0) < r.shape[1]:
            raise ValueError(f"{name}: rows overlap in memory (row stride {r.stride(0)} < n); cannot write them")
        rows.append((name, r))
    if torch.compiler.is_compiling():
        return
    for i, (name, r) in enumerate(rows[1:], 1):
        for other, o in rows[:i]:
            if rows_overlap(o, r):
                raise ValueError(f"{name}: must not share memory with {other}")


def _check_result(result: object, input: torch.Tensor) -> None:
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"result: expected a torch.Tensor; got {type(result).__name__}")
    _check_fp8_dtype(result.dtype, "result")
    if result.shape != input.shape:
        raise ValueError(f"result: expected shape {tuple(input.shape)} (input's shape); got {tuple(result.shape)}")
    if not result.is_contiguous():
        raise ValueError("result: must be contiguous (as vLLM requires)")


def rms_norm_static_fp8_quant(result: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                              scale: torch.Tensor, epsilon: float) -> None:
    """vLLM's rms_norm_static_fp8_quant: result <- FP8 of rms_norm(input) * (1 / scale), saturated."""
    _validate(input, weight, epsilon, None, "llama", 0.0, inplace=False)
    _check_result(result, input)
    _, scale_t = fp8.check_fp8(input, weight, None, result.dtype, scale, None, what="result")
    _check_writes(input, [("result", result)])
    torch.ops.bi_norm.rms_norm_fp8_(result, input, None, weight, scale_t, None, float(epsilon), "llama", 0.0, 0)


def fused_add_rms_norm_static_fp8_quant(result: torch.Tensor, input: torch.Tensor, residual: torch.Tensor,
                                        weight: torch.Tensor, scale: torch.Tensor, epsilon: float) -> None:
    """vLLM's fused_add_rms_norm_static_fp8_quant: residual <- input + residual (in place, in the
    residual's dtype), result <- FP8 of rms_norm(residual) * (1 / scale); input is left as it is."""
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual: expected a torch.Tensor; got {type(residual).__name__}")
    _validate(input, weight, epsilon, residual, "llama", 0.0, inplace=False)
    _check_result(result, input)
    _, scale_t = fp8.check_fp8(input, weight, residual, result.dtype, scale, None, what="result")
    _check_writes(input, [("residual", residual), ("result", result)])
    torch.ops.bi_norm.rms_norm_fp8_(result, input, residual, weight, scale_t, None, float(epsilon), "llama", 0.0, 0)


def rms_norm_per_block_quant(
    input: torch.Tensor,
    weight: torch.Tensor,
    epsilon: float,
    quant_dtype: torch.dtype,
    group_size: Sequence[int],
    scale_ub: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    is_scale_transposed: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """vLLM's rms_norm_per_block_quant (vllm._custom_ops): FP8 output with one float32 scale per
    token and group of group_size[1] channels (group_size = [1, 64] or [1, 128]); the residual, if
    given, becomes input + residual in place and is what gets normalised."""
    _validate(input, weight, epsilon, residual, "llama", 0.0, inplace=False)
    _check_fp8_dtype(quant_dtype, "quant_dtype")
    if (isinstance(group_size, (str, bytes)) or not isinstance(group_size, Sequence) or len(group_size) != 2
            or group_size[0] != 1):
        raise ValueError(f"group_size: expected [1, g] (one token by g channels, g in 64, 128); got {group_size!r}")
    if scale_ub is not None:
        raise ValueError("scale_ub: not supported; contract v1.2's per-token-group scales have no upper bound")
    g = group_size[1]
    fp8.check_fp8(input, weight, residual, quant_dtype, None, g, what="quant_dtype")
    n = input.shape[-1]
    tokens = input.numel() // n
    output = torch.empty(input.shape, dtype=quant_dtype, device=input.device)
    if is_scale_transposed:
        scales = torch.empty((n // g, tokens), dtype=torch.float32, device=input.device).transpose(0, 1)
    else:
        scales = torch.empty((tokens, n // g), dtype=torch.float32, device=input.device)
    _check_writes(input, [] if residual is None else [("residual", residual)])
    torch.ops.bi_norm.rms_norm_fp8_(output, input, residual, weight, None, scales, float(epsilon), "llama", 0.0, g)
    return output, scales

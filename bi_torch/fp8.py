"""FP8 output (contract v1.2, NUMERICS.md "FP8 output"): validation and the custom ops behind
`bi_torch.rms_norm(..., out_dtype=torch.float8_e4m3fn, scale=... | group_size=...)`.

The forward kernel's step 6 quantizes in registers (bi_torch/triton_kernel.py, QUANT "static" or
"group") and writes the FP8 bits through a uint8 view: no extra pass over memory. Nothing here reads
a CUDA tensor's value, so the calls capture into CUDA graphs; a static scale on the GPU is checked
for shape, dtype and device only (its value would need a synchronisation). FP8 outputs have no
gradient: with grad mode on, an input that requires grad raises RuntimeError at the call.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from bridge.numerics.contract import FP8_FORMATS, as_float32, check_fp8_args

from .launch import launch
from .rows import as_rows, dtype_name

# The FP8 dtypes torch has, by the contract's names (float8_e5m2 is rejected by name, "not supported yet").
FP8_DTYPES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}
TORCH_FP8 = {name: dtype for dtype, name in FP8_DTYPES.items() if name in FP8_FORMATS}


def fp8_format(out_dtype: object) -> Optional[str]:
    """The contract's name of out_dtype, for check_fp8_args (which judges it against x's dtype). A
    torch.dtype only."""
    if out_dtype is None:
        return None
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"out_dtype: expected None or a torch.dtype ({', '.join(f'torch.{n}' for n in FP8_FORMATS)}); "
                        f"got {type(out_dtype).__name__}")
    return FP8_DTYPES.get(out_dtype) or dtype_name(out_dtype)


def scale_tensor(scale: object, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], dict]:
    """(the scale as a tensor for the kernel, check_fp8_args' scale arguments). A Python float
    becomes a 0-d float32 tensor on x's device (a fill, no host-device copy); a tensor's value is read
    only on the CPU outside torch.compile."""
    if scale is None:
        return None, {}
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise TypeError(f"scale: expected a float32 torch.Tensor of shape () or (1,), or a Python float; "
                        f"got {type(scale).__name__}")
    if not isinstance(scale, torch.Tensor):
        value = as_float32(float(scale))
        check = dict(scale_shape=(), scale_dtype="float32", scale_value=value)
        return (lambda: torch.full((), value, dtype=torch.float32, device=x.device)), check
    value = None
    if (scale.device.type == "cpu" and scale.numel() == 1 and scale.dtype == torch.float32
            and not torch.compiler.is_compiling()):
        value = float(scale.detach().reshape(()))
    check = dict(scale_shape=tuple(scale.shape), scale_dtype=dtype_name(scale.dtype), scale_value=value)
    return (lambda: scale.detach()), check


def check_fp8(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], out_dtype: object,
              scale: object, group_size: object, what: str = "out_dtype"
              ) -> Tuple[Optional[str], Optional[torch.Tensor]]:
    """Every FP8 rule (bridge.numerics.contract.check_fp8_args) before any kernel runs, after ops._validate.
    Returns (the FP8 format's name or None for no quantization, the static scale tensor or None)."""
    name = fp8_format(out_dtype)
    make_scale, scale_args = scale_tensor(scale, x)
    check_fp8_args(n=x.shape[-1], out_dtype=name, group_size=group_size, x_dtype=dtype_name(x.dtype), **scale_args)
    if isinstance(scale, torch.Tensor) and scale.device != x.device:
        raise ValueError(f"scale: expected a tensor on {x.device} (x's device); got {scale.device}")
    if name not in FP8_FORMATS:
        return None, None
    if torch.is_grad_enabled():
        for arg, t in (("x", x), ("weight", weight), ("residual", residual), ("scale", scale)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(
                    f"{what}: {name} outputs have no gradient (NUMERICS.md, FP8 output), but {arg} requires grad. "
                    f"Run under torch.no_grad() or torch.inference_mode(), or pass {arg}.detach().")
    return name, None if make_scale is None else make_scale()


def _buffers(x: torch.Tensor, residual: Optional[torch.Tensor], group_size: int, out_dtype: torch.dtype
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out in FP8, scales (rows, n // group_size) float32 or an empty placeholder for group_size 0,
    new residual or an empty placeholder); the fake too."""
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    scales = torch.empty((rows, n // group_size) if group_size else (0,), dtype=torch.float32, device=x.device)
    new_residual = torch.empty(residual.shape if residual is not None else (0,),
                               dtype=residual.dtype if residual is not None else x.dtype, device=x.device)
    return out, scales, new_residual


def launch_fp8(out: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor],
               new_residual: Optional[torch.Tensor], weight: torch.Tensor, scale: Optional[torch.Tensor],
               scales: Optional[torch.Tensor], eps: float, norm_mode: str, weight_offset: float,
               group_size: int) -> None:
    """The kernel on row views: out (FP8, row-major) through its uint8 view; scales row-major
    (rows, n // group_size) float32 or None (static)."""
    launch(as_rows(x, "x"), weight, as_rows(out, "out").view(torch.uint8), eps,
           None if residual is None else as_rows(residual, "residual"),
           None if new_residual is None else as_rows(new_residual, "residual"), norm_mode, weight_offset,
           fp8=FP8_DTYPES[out.dtype], scale=scale, scales=scales, group_size=group_size)


@torch.library.custom_op("bi_norm::rms_norm_fp8", mutates_args=())
def _rms_norm_fp8_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                     scale: Optional[torch.Tensor], eps: float, norm_mode: str, weight_offset: float,
                     group_size: int, out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, scales, new_residual): scale given (static) or group_size > 0; placeholders are empty."""
    out, scales, new_residual = _buffers(x, residual, group_size, out_dtype)
    launch_fp8(out, x, residual, new_residual if residual is not None else None, weight, scale,
               scales if group_size else None, eps, norm_mode, weight_offset, group_size)
    return out, scales, new_residual


@_rms_norm_fp8_op.register_fake
def _(x, residual, weight, scale, eps, norm_mode, weight_offset, group_size, out_dtype):
    return _buffers(x, residual, group_size, out_dtype)


def rms_norm_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor],
    mode: str,
    weight_offset: float,
    fmt: str,
    scale: Optional[torch.Tensor],
    group_size: Optional[int],
) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """bi_torch.rms_norm's FP8 branch, arguments already checked (check_fp8): static `out` or
    (out, new_residual); per group (out, scales) or (out, scales, new_residual), scales of shape
    x.shape[:-1] + (n // group_size,)."""
    out, scales, new_residual = torch.ops.bi_norm.rms_norm_fp8(
        x, residual, weight, scale, float(eps), mode, float(weight_offset), group_size or 0, TORCH_FP8[fmt])
    if group_size:
        scales = scales.view(x.shape[:-1] + (x.shape[-1] // group_size,))
        return (out, scales) if residual is None else (out, scales, new_residual)
    return out if residual is None else (out, new_residual)


@torch.library.custom_op("bi_norm::rms_norm_fp8_", mutates_args=("out", "residual", "scales"))
def _rms_norm_fp8_inplace_op(out: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor],
                             weight: torch.Tensor, scale: Optional[torch.Tensor], scales: Optional[torch.Tensor],
                             eps: float, norm_mode: str, weight_offset: float, group_size: int) -> None:
    """Into given buffers (vLLM's convention, bi_torch/vllm_fp8.py): out (FP8, x's shape), the
    residual updated in place to the new residual, scales (rows, n // group_size) float32 of any
    strides (vLLM's transposed layout goes through a row-major buffer)."""
    rows_scales = scales
    if scales is not None and not scales.is_contiguous():
        rows_scales = torch.empty(scales.shape, dtype=torch.float32, device=scales.device)
    launch_fp8(out, x, residual, residual, weight, scale, rows_scales, eps, norm_mode, weight_offset, group_size)
    if rows_scales is not scales:
        scales.copy_(rows_scales)


@_rms_norm_fp8_inplace_op.register_fake
def _(out, x, residual, weight, scale, scales, eps, norm_mode, weight_offset, group_size):
    return None

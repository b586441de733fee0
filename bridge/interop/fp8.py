"""FP8 across frameworks (contract v1.2): FP8 arrays through DLPack, each framework's FP8 arguments
from the other's, and `cross_check_fp8`, bi_torch's and bi_jax's FP8 output compared bit for bit
on the same device memory: out's codes, the scales, the new residual.

FP8 arrays cross as float8_e4m3fn where DLPack carries it (torch and JAX on the CPU do; see
`fp8_dlpack_route`), else as their uint8 codes, bitcast back on the other side.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..numerics.contract import missing_fp8_arguments, split_fp8
from .device import _bi_jax, best_device, first_output_difference
from .dlpack import to_jax, to_torch

if TYPE_CHECKING:
    import jax
    import torch


def fp8_probe() -> Optional[str]:
    """None when both frameworks' rms_norm take the FP8 arguments (out_dtype, scale, group_size)."""
    import bi_jax
    import bi_torch

    return (missing_fp8_arguments(bi_torch.rms_norm, "bi_torch.rms_norm")
            or missing_fp8_arguments(bi_jax.rms_norm, "bi_jax.rms_norm"))


def _is_fp8(name: str) -> bool:
    return name.startswith("float8")


def _fp8_to_jax(t: torch.Tensor) -> jax.Array:
    """to_jax of an FP8 tensor: as it is where DLPack carries FP8, else its uint8 codes bitcast in JAX."""
    import jax.numpy as jnp
    import torch
    from jax import lax

    name = str(t.dtype).replace("torch.", "")
    try:
        return to_jax(t)
    except (TypeError, ValueError, RuntimeError, BufferError):
        return lax.bitcast_convert_type(to_jax(t.view(torch.uint8)), jnp.dtype(name))


def _fp8_to_torch(a: jax.Array) -> torch.Tensor:
    """to_torch of an FP8 array: as it is where DLPack carries FP8, else its uint8 codes viewed in torch."""
    import jax.numpy as jnp
    import torch
    from jax import lax

    try:
        return to_torch(a)
    except (TypeError, ValueError, RuntimeError, BufferError):
        return to_torch(lax.bitcast_convert_type(a, jnp.uint8)).view(getattr(torch, a.dtype.name))


def _any_to_jax(t: torch.Tensor) -> jax.Array:
    return _fp8_to_jax(t) if _is_fp8(str(t.dtype).replace("torch.", "")) else to_jax(t)


def _any_to_torch(a: jax.Array) -> torch.Tensor:
    return _fp8_to_torch(a) if _is_fp8(a.dtype.name) else to_torch(a)


@functools.lru_cache(maxsize=None)
def fp8_dlpack_route(device: str) -> str:
    """How FP8 arrays cross between torch and JAX on `device` ("cpu" or "cuda"): "as float8_e4m3fn"
    when DLPack carries the dtype both ways, else "as uint8 views" (and which direction refused)."""
    import torch

    t = torch.zeros(4, dtype=torch.float8_e4m3fn, device=device)
    refused = []
    try:
        a = to_jax(t)
        if a.dtype.name != "float8_e4m3fn":
            refused.append(f"torch -> jax gave {a.dtype.name}")
    except (TypeError, ValueError, RuntimeError, BufferError) as e:
        refused.append(f"torch -> jax: {type(e).__name__}: {e}")
        a = _fp8_to_jax(t)
    try:
        if to_torch(a).dtype != torch.float8_e4m3fn:
            refused.append("jax -> torch changed the dtype")
    except (TypeError, ValueError, RuntimeError, BufferError) as e:
        refused.append(f"jax -> torch: {type(e).__name__}: {e}")
    return "as float8_e4m3fn" if not refused else f"as uint8 views ({'; '.join(refused)})"


def _torch_quantization(out_dtype, scale, group_size) -> dict:
    """bi_torch's FP8 keyword arguments from the caller's: out_dtype by name (a jnp/numpy dtype or a
    string), a JAX scale as its torch view; empty when there is no FP8 argument."""
    import jax.numpy as jnp
    import torch

    if out_dtype is None and scale is None and group_size is None:
        return {}
    kwargs = {"out_dtype": None if out_dtype is None else getattr(torch, jnp.dtype(out_dtype).name)}
    if scale is not None:
        kwargs["scale"] = scale if isinstance(scale, (int, float, torch.Tensor)) else to_torch(scale)
    if group_size is not None:
        kwargs["group_size"] = group_size
    return kwargs


def _jax_quantization(out_dtype, scale, group_size) -> dict:
    """bi_jax's FP8 keyword arguments from the caller's: out_dtype by name (a torch dtype or a
    string), a torch scale as its JAX view; empty when there is no FP8 argument."""
    import jax
    import jax.numpy as jnp

    if out_dtype is None and scale is None and group_size is None:
        return {}
    kwargs = {"out_dtype": None if out_dtype is None else jnp.dtype(str(out_dtype).replace("torch.", ""))}
    if scale is not None:
        kwargs["scale"] = scale if isinstance(scale, (int, float, jax.Array)) else to_jax(scale)
    if group_size is not None:
        kwargs["group_size"] = group_size
    return kwargs


def cross_check_fp8(
    x_np: np.ndarray,
    weight_np: np.ndarray,
    eps: float,
    residual_np: Optional[np.ndarray],
    mode: str,
    weight_offset: float,
    quantization: dict,
    *,
    device: Optional[str] = None,
) -> Optional[str]:
    """bi_torch's and bi_jax's FP8 output of the same inputs, compared bit for bit: None if equal.

    quantization: {"out_dtype": "float8_e4m3fn"} with "scale" (a float32 numpy array of shape () or
    (1,)) or "group_size" (golden_fp8.Fp8Case.quantization()). Both run on the very same device
    memory (the scale too: a torch tensor and its JAX view); out (FP8 codes), the scales and the new
    residual are compared in JAX, FP8 crossing as `fp8_dlpack_route` says. Otherwise a one-line
    description: which output, how many elements differ, the first differing index and both values.
    """
    import torch

    import bi_torch

    device = device or best_device()
    x, weight, residual = (None if a is None else bi_torch.from_numpy(a, device)
                           for a in (x_np, weight_np, residual_np))
    scale = None
    if "scale" in quantization:
        s = np.asarray(quantization["scale"], np.float32)
        scale = torch.from_numpy(s.reshape(-1).copy()).reshape(s.shape).to(device)
    group_size = quantization.get("group_size")
    by_torch = bi_torch.rms_norm(x, weight, eps, residual, mode=mode, weight_offset=weight_offset,
                                 **_torch_quantization(quantization["out_dtype"], scale, group_size))
    by_jax = _bi_jax(to_jax(x), to_jax(weight), eps, None if residual is None else to_jax(residual), mode,
                     weight_offset, **_jax_quantization(quantization["out_dtype"], scale, group_size))
    grouped, has_residual = group_size is not None, residual is not None
    return first_output_difference(("out", "scales", "new_residual"), split_fp8(by_torch, grouped, has_residual),
                                   split_fp8(by_jax, grouped, has_residual), _any_to_jax)

"""Each framework's kernel on the other framework's arrays, and a bitwise cross-check on the device.

`torch_rms_norm_on_jax` runs bi_torch's Triton kernel on JAX arrays and `jax_rms_norm_on_torch`
runs bi_jax's Pallas kernel on torch tensors: inputs and results cross through `bridge.dlpack`
without a copy or a host round trip, and come back in the caller's framework. `cross_check` runs
both kernels on the same device memory and compares their bits there, in JAX; `cross_check_backward`
does the same for the gradients (torch autograd against jax.vjp, NUMERICS.md's backward), and
`cross_check_fp8` for the FP8 output (contract v1.2): out's codes, the scales, the new residual.

FP8 arrays cross as float8_e4m3fn where DLPack carries it (torch and JAX on the CPU do; see
`fp8_dlpack_route`), else as their uint8 codes, bitcast back on the other side.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Callable, Optional, Tuple, Union

import numpy as np

from .dlpack import to_jax, to_torch

if TYPE_CHECKING:
    import jax
    import torch


def probe() -> Optional[str]:
    """None when both kernels can run here, else why not (as `bridge.backends` probes say it)."""
    try:
        import bi_jax  # noqa: F401
        import bi_torch  # noqa: F401
    except ImportError as e:
        return f"needs torch, triton and jax ({e.name} not importable)"
    return None


def fp8_probe() -> Optional[str]:
    """None when both frameworks' rms_norm take the FP8 arguments (out_dtype, scale, group_size)."""
    import bi_jax
    import bi_torch

    from .backends import _needs_out_dtype
    from .verify_report import Unavailable

    try:
        _needs_out_dtype(bi_torch.rms_norm, "bi_torch.rms_norm")
        _needs_out_dtype(bi_jax.rms_norm, "bi_jax.rms_norm")
    except Unavailable as e:
        return str(e)
    return None


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


def _map(result, convert):
    """convert applied to a result that is one array or a tuple of them, keeping its shape."""
    return tuple(convert(a) for a in result) if isinstance(result, (tuple, list)) else convert(result)


def torch_rms_norm_on_jax(
    x: jax.Array,
    weight: jax.Array,
    eps: float = 1e-6,
    residual: Optional[jax.Array] = None,
    *,
    mode: str = "llama",
    weight_offset: float = 0.0,
    out_dtype=None,
    scale=None,
    group_size: Optional[int] = None,
) -> Union[jax.Array, Tuple[jax.Array, ...]]:
    """bi_torch.rms_norm on JAX arrays: out, or (out, new_residual), as JAX arrays on x's device.

    FP8 (contract v1.2): out_dtype jnp.float8_e4m3fn (or its name), a JAX or Python scale or a
    group_size; the result is bi_torch's tuple (out[, scales][, new_residual]) in JAX.
    """
    import bi_torch

    result = bi_torch.rms_norm(to_torch(x), to_torch(weight), eps, None if residual is None else to_torch(residual),
                               mode=mode, weight_offset=weight_offset,
                               **_torch_quantization(out_dtype, scale, group_size))
    return _map(result, _any_to_jax)


def jax_rms_norm_on_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: Optional[torch.Tensor] = None,
    *,
    mode: str = "llama",
    weight_offset: float = 0.0,
    out_dtype=None,
    scale=None,
    group_size: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """bi_jax.rms_norm on torch tensors: out, or (out, new_residual), as torch tensors on x's device.

    The compiled Pallas kernel runs on a GPU, interpret mode on the CPU: chosen by the tensors'
    device, not by JAX's default backend (CPU tensors on a GPU machine stay on the CPU).
    FP8 (contract v1.2): out_dtype torch.float8_e4m3fn (or its name), a torch or Python scale or a
    group_size; the result is bi_jax's tuple (out[, scales][, new_residual]) in torch.
    """
    result = _bi_jax(to_jax(x), to_jax(weight), eps, None if residual is None else to_jax(residual), mode,
                     weight_offset, **_jax_quantization(out_dtype, scale, group_size))
    return _map(result, _any_to_torch)


def _bi_jax(x: jax.Array, weight: jax.Array, eps: float, residual: Optional[jax.Array], mode: str,
            weight_offset: float, **fp8) -> Union[jax.Array, Tuple[jax.Array, ...]]:
    """bi_jax.rms_norm on x's device: compiled on a GPU, interpret mode on the CPU; fp8: its FP8
    keyword arguments (out_dtype, scale or group_size), if any."""
    import jax

    import bi_jax

    (device,) = x.devices()
    # JAX's default device is part of jit's cache key: set it only where it differs (CPU arrays on
    # a GPU machine), or every call here would recompile kernels the caller has compiled already.
    placed = contextlib.nullcontext() if device == jax.devices()[0] else jax.default_device(device)
    with placed:
        return bi_jax.rms_norm(x, weight, eps, residual, mode=mode, weight_offset=weight_offset,
                               interpret=device.platform != "gpu", **fp8)


def first_bit_difference(a: jax.Array, b: jax.Array, labels: Tuple[str, str] = ("a", "b")) -> Optional[str]:
    """None if float arrays a and b have the same shape, dtype and bits; else the first difference.

    The comparison runs where the arrays are (integer views, on the device); only a few scalars
    come back to the host.
    """
    import jax.numpy as jnp
    from jax import lax

    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{labels[0]} is {a.dtype}{list(a.shape)}, {labels[1]} is {b.dtype}{list(b.shape)}"
    count, i = (int(v) for v in _count_and_first_difference()(a, b))
    if count == 0:
        return None
    where = tuple(int(k) for k in np.unravel_index(i, a.shape))
    uint = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
    width = 2 * a.dtype.itemsize

    def show(label: str, v: jax.Array) -> str:
        value = v.ravel()[i]
        return f"{label} {value.item()!r} (0x{int(lax.bitcast_convert_type(value, uint)):0{width}x})"

    return (f"{count} of {a.size} elements differ; first at index {where}: "
            f"{show(labels[0], a)}, {show(labels[1], b)}")


@functools.lru_cache(maxsize=None)
def _count_and_first_difference() -> Callable:
    """One compiled program (per shape and dtype): how many elements differ in bits, and the first."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    @jax.jit
    def run(a: jax.Array, b: jax.Array) -> Tuple[jax.Array, jax.Array]:
        uint = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
        differs = (lax.bitcast_convert_type(a, uint) != lax.bitcast_convert_type(b, uint)).ravel()
        return jnp.sum(differs), jnp.argmax(differs)

    return run


def best_device() -> str:
    """"cuda" when both torch and JAX see a GPU, else "cpu"."""
    import jax
    import torch

    return "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"


def cross_check(
    x_np: np.ndarray,
    weight_np: np.ndarray,
    eps: float,
    residual_np: Optional[np.ndarray],
    mode: str,
    weight_offset: float,
    *,
    device: Optional[str] = None,
) -> Optional[str]:
    """bi_torch and bi_jax on the same inputs, compared bit for bit on the device: None if equal.

    bi_torch runs on torch tensors on `device` ("cuda" or "cpu"; default `best_device()`), its
    results go to JAX zero-copy; bi_jax runs on the very same input memory (to_jax of the torch
    inputs) on JAX's matching device. Otherwise a one-line description: which output, how many
    elements differ, the first differing index and both values.
    """
    import bi_torch

    device = device or best_device()
    x, weight, residual = (None if a is None else bi_torch.from_numpy(a, device)
                           for a in (x_np, weight_np, residual_np))
    by_torch = bi_torch.rms_norm(x, weight, eps, residual, mode=mode, weight_offset=weight_offset)
    by_jax = _bi_jax(to_jax(x), to_jax(weight), eps, None if residual is None else to_jax(residual), mode,
                     weight_offset)
    if residual is None:
        by_torch, by_jax = (by_torch,), (by_jax,)
    for what, t, j in zip(("out", "new_residual"), by_torch, by_jax):
        problem = first_bit_difference(to_jax(t), j, labels=("torch", "jax"))
        if problem:
            return f"{what}: {problem}"
    return None


def _bi_jax_backward(x: jax.Array, weight: jax.Array, grad_out: jax.Array, eps: float, residual: Optional[jax.Array],
                     grad_new_residual: Optional[jax.Array], mode: str, weight_offset: float) -> Tuple[jax.Array, ...]:
    """bi_jax's gradients by jax.vjp on x's device, in reference.rms_norm_backward's order.

    An absent grad_new_residual leaves the new residual out of the differentiated outputs, as
    torch autograd does when it is not among the outputs: JAX's symbolic zero, which B6 adds as +0.0.
    """
    import jax

    import bi_jax

    (device,) = x.devices()
    placed = contextlib.nullcontext() if device == jax.devices()[0] else jax.default_device(device)

    def norm(*args):
        result = bi_jax.rms_norm(args[0], args[1], eps, args[2] if residual is not None else None, mode=mode,
                                 weight_offset=weight_offset, interpret=device.platform != "gpu")
        return result[0] if residual is not None and grad_new_residual is None else result

    primals = (x, weight) if residual is None else (x, weight, residual)
    with placed:
        _, vjp = jax.vjp(norm, *primals)
        grads = vjp(grad_out if residual is None or grad_new_residual is None else (grad_out, grad_new_residual))
    return tuple(grads) if residual is None else (grads[0], grads[2], grads[1])


def _bi_torch_backward(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, eps: float,
                       residual: Optional[torch.Tensor], grad_new_residual: Optional[torch.Tensor], mode: str,
                       weight_offset: float) -> Tuple[torch.Tensor, ...]:
    """bi_torch's gradients by torch autograd, in reference.rms_norm_backward's order."""
    import torch

    import bi_torch

    inputs = [t.detach().requires_grad_() for t in (x, weight, residual) if t is not None]
    with torch.enable_grad():
        result = bi_torch.rms_norm(inputs[0], inputs[1], eps, inputs[2] if residual is not None else None, mode=mode,
                                   weight_offset=weight_offset)
    outputs, cotangents = [result if residual is None else result[0]], [grad_out]
    if grad_new_residual is not None:
        outputs.append(result[1])
        cotangents.append(grad_new_residual)
    grads = torch.autograd.grad(outputs, inputs, cotangents)
    return tuple(grads) if residual is None else (grads[0], grads[2], grads[1])


def cross_check_backward(
    x_np: np.ndarray,
    weight_np: np.ndarray,
    grad_out_np: np.ndarray,
    eps: float,
    residual_np: Optional[np.ndarray],
    grad_new_residual_np: Optional[np.ndarray],
    mode: str,
    weight_offset: float,
    *,
    device: Optional[str] = None,
) -> Optional[str]:
    """bi_torch's and bi_jax's gradients of the same inputs, compared bit for bit: None if equal.

    Both frameworks differentiate the very same device memory (torch tensors on `device`, default
    `best_device()`, and their DLPack views in JAX); torch's gradients go to JAX zero-copy and are
    compared there. grad_new_residual None is absent in both. Otherwise a one-line description:
    which gradient, how many elements differ, the first differing index and both values.
    """
    import bi_torch

    device = device or best_device()
    tensors = [None if a is None else bi_torch.from_numpy(a, device)
               for a in (x_np, weight_np, grad_out_np, residual_np, grad_new_residual_np)]
    by_torch = _bi_torch_backward(*tensors[:3], eps, *tensors[3:], mode, weight_offset)
    views = [None if t is None else to_jax(t) for t in tensors]
    by_jax = _bi_jax_backward(*views[:3], eps, *views[3:], mode, weight_offset)
    names = ("grad_x", "grad_weight") if residual_np is None else ("grad_x", "grad_residual", "grad_weight")
    for what, t, j in zip(names, by_torch, by_jax):
        problem = first_bit_difference(to_jax(t), j, labels=("torch", "jax"))
        if problem:
            return f"{what}: {problem}"
    return None


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

    from .backends import split_fp8

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
    parts = zip(("out", "scales", "new_residual"), split_fp8(by_torch, grouped, has_residual),
                split_fp8(by_jax, grouped, has_residual))
    for what, t, j in parts:
        if t is None:
            continue
        problem = first_bit_difference(_any_to_jax(t), j, labels=("torch", "jax"))
        if problem:
            return f"{what}: {problem}"
    return None

"""The backends `bi-norm verify` can run, each behind one numpy-in, numpy-out function.

Frameworks are imported lazily, inside each backend, so that `import bridge` stays free of
torch and jax and a missing framework only makes its backends unavailable.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import numpy as np

from ..numerics import reference
from ..numerics.contract import missing_fp8_arguments, split_fp8
from ..numerics.reference_fp8 import fp8_numpy_dtype
from .report import Unavailable

# (x, weight, eps, residual, mode, weight_offset) -> out, or (out, new_residual) with a residual.
RunFn = Callable[..., object]
# (x, weight, grad_out, eps, residual, grad_new_residual, mode, weight_offset) -> what
# reference.rms_norm_backward returns: (grad_x, grad_weight), or (grad_x, grad_residual, grad_weight).
BackwardFn = Callable[..., Tuple[np.ndarray, ...]]
# (x, weight, eps, residual, mode, weight_offset, quantization) -> (out, scales or None, new_residual
# or None), quantization being golden_fp8.Fp8Case.quantization(): {"out_dtype": "float8_e4m3fn"} and
# "scale" (a float32 numpy array of shape () or (1,)) or "group_size". Each runner checks that the API
# returns the spec's tuple: out, (out, new_residual), (out, scales) or (out, scales, new_residual).
Fp8Fn = Callable[..., Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]]


@dataclasses.dataclass
class Backend:
    name: str
    description: str
    probe: Callable[[], Optional[str]]  # None when usable, else why not
    make_runner: Callable[[], RunFn]
    # Raises NotImplementedError (from the framework) where the kernel has no backward yet.
    make_backward_runner: Callable[[], BackwardFn]
    # XLA:CPU flushes float32 subnormals (bridge/numerics/subnormals.py): gradients through one are not compared.
    flushes_subnormals: bool = False
    # FP8 output (contract v1.2); raises report.Unavailable where the API has none.
    make_fp8_runner: Optional[Callable[[], Fp8Fn]] = None
    # The widest row the forward's kernel takes (a callable: frameworks load only when the backend
    # runs), None for no limit; wider forward cases are left out and counted in the pass's note.
    max_n: Optional[Callable[[], int]] = None


def _reference_fp8(x, weight, eps, residual, mode, weight_offset, quantization):
    result = reference.rms_norm(x, weight, eps, residual, mode=mode, weight_offset=weight_offset, **quantization)
    return split_fp8(result, "group_size" in quantization, residual is not None)


def _needs_out_dtype(fn: Callable, where: str) -> None:
    """Unavailable unless fn takes out_dtype, scale and group_size (the FP8 spec's arguments)."""
    problem = missing_fp8_arguments(fn, where)
    if problem is not None:
        raise Unavailable(problem)


def _reference_backward(x, weight, grad_out, eps, residual, grad_new_residual, mode, weight_offset):
    return reference.rms_norm_backward(x, weight, grad_out, eps, residual, grad_new_residual, mode=mode,
                                       weight_offset=weight_offset)


def _torch_probe(device: str) -> Optional[str]:
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as e:
        return f"needs torch and triton ({e.name} not installed)"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import bi_torch  # noqa: F401
    except ImportError as e:
        return f"bi_torch failed to import: {e}"
    return None


def _torch_runner(device: str) -> RunFn:
    import bi_torch

    def to_torch(a: Optional[np.ndarray]):
        return None if a is None else bi_torch.from_numpy(a, device)

    def run(x, weight, eps, residual, mode, weight_offset):
        result = bi_torch.rms_norm(to_torch(x), to_torch(weight), eps, to_torch(residual), mode=mode,
                                   weight_offset=weight_offset)
        if residual is None:
            return bi_torch.to_numpy(result)
        return bi_torch.to_numpy(result[0]), bi_torch.to_numpy(result[1])

    return run


def _torch_backward_runner(device: str) -> BackwardFn:
    import torch

    import bi_torch

    def run(x, weight, grad_out, eps, residual, grad_new_residual, mode, weight_offset):
        inputs = [bi_torch.from_numpy(a, device).requires_grad_() for a in (x, weight, residual) if a is not None]
        with torch.enable_grad():
            result = bi_torch.rms_norm(*inputs[:2], eps, inputs[2] if residual is not None else None, mode=mode,
                                       weight_offset=weight_offset)
        outputs, cotangents = [result if residual is None else result[0]], [grad_out]
        if grad_new_residual is not None:
            outputs.append(result[1])
            cotangents.append(grad_new_residual)
        # Every input reaches out, so none is unused (no allow_unused): an absent grad_new_residual only
        # leaves the new residual out of the graph's outputs.
        grads = torch.autograd.grad(outputs, inputs, [bi_torch.from_numpy(g, device) for g in cotangents])
        grad_x, grad_weight, *grad_residual = (bi_torch.to_numpy(g) for g in grads)
        return (grad_x, *grad_residual, grad_weight)

    return run


def _torch_fp8_runner(device: str) -> Fp8Fn:
    """bi_torch.rms_norm(..., out_dtype=torch.float8_e4m3fn, scale=<float32 tensor on x's device> |
    group_size=...), outputs back to numpy through uint8 views (FP8) and bi_torch.to_numpy."""
    import torch

    import bi_torch

    _needs_out_dtype(bi_torch.rms_norm, "bi_torch.rms_norm")

    def to_torch(a: Optional[np.ndarray]):
        return None if a is None else bi_torch.from_numpy(a, device)

    def fp8_to_numpy(t) -> np.ndarray:
        name = str(t.dtype).replace("torch.", "")
        if t.element_size() != 1 or not name.startswith("float8"):
            raise TypeError(f"out: expected an FP8 tensor; got {t.dtype}")
        return t.detach().cpu().contiguous().view(torch.uint8).numpy().copy().view(fp8_numpy_dtype(name))

    def run(x, weight, eps, residual, mode, weight_offset, quantization):
        kwargs = {"out_dtype": getattr(torch, quantization["out_dtype"])}
        if "scale" in quantization:
            scale = np.asarray(quantization["scale"], np.float32)
            kwargs["scale"] = torch.from_numpy(scale.reshape(-1).copy()).reshape(scale.shape).to(device)
        else:
            kwargs["group_size"] = quantization["group_size"]
        result = bi_torch.rms_norm(to_torch(x), to_torch(weight), eps, to_torch(residual), mode=mode,
                                   weight_offset=weight_offset, **kwargs)
        out, scales, new_residual = split_fp8(result, "group_size" in quantization, residual is not None)
        return (fp8_to_numpy(out), None if scales is None else bi_torch.to_numpy(scales),
                None if new_residual is None else bi_torch.to_numpy(new_residual))

    return run


def _jax_probe(interpret: bool) -> Optional[str]:
    try:
        import jax
    except ImportError as e:
        return f"needs jax ({e.name} not installed)"
    if not interpret and jax.default_backend() != "gpu":
        return "no GPU visible to JAX"
    try:
        import bi_jax  # noqa: F401
    except ImportError as e:
        return f"bi_jax failed to import: {e}"
    return None


def _jax_put(interpret: bool) -> Callable[[np.ndarray], object]:
    """numpy -> jax.Array on the device the backend runs on (the CPU in interpret mode)."""
    import jax
    import jax.numpy as jnp

    device = jax.devices("cpu")[0] if interpret else jax.devices()[0]
    return lambda a: jax.device_put(jnp.asarray(a), device)


def _mosaic_probe() -> Optional[str]:
    """_jax_probe on a GPU, then whether bi_jax's Mosaic GPU kernel can run there (jax's API, the GPU)."""
    reason = _jax_probe(False)
    if reason is not None:
        return reason
    from bi_jax import selection

    return selection.jax_lacks() or selection.gpu_lacks()


def _mosaic_max_n() -> int:
    from bi_jax import mosaic_kernel

    return mosaic_kernel.MAX_N


def _jax_runner(interpret: bool, pallas_backend: str) -> RunFn:
    import bi_jax

    put = _jax_put(interpret)

    def run(x, weight, eps, residual, mode, weight_offset):
        result = bi_jax.rms_norm(put(x), put(weight), eps, None if residual is None else put(residual), mode=mode,
                                 weight_offset=weight_offset, interpret=interpret, pallas_backend=pallas_backend)
        if residual is None:
            return np.asarray(result)
        return np.asarray(result[0]), np.asarray(result[1])

    return run


def _jax_backward_runner(interpret: bool, pallas_backend: str) -> BackwardFn:
    import jax

    import bi_jax

    put = _jax_put(interpret)

    def run(x, weight, grad_out, eps, residual, grad_new_residual, mode, weight_offset):
        def norm(*args):
            return bi_jax.rms_norm(args[0], args[1], eps, args[2] if len(args) > 2 else None, mode=mode,
                                   weight_offset=weight_offset, interpret=interpret, pallas_backend=pallas_backend)

        _, vjp = jax.vjp(norm, *(put(a) for a in (x, weight, residual) if a is not None))
        cotangent = put(grad_out)
        if residual is not None:
            # JAX needs a cotangent for every output: zeros for an absent grad_new_residual, which the
            # contract makes the same bits (B6 adds +0.0 either way).
            g_r = np.zeros_like(residual) if grad_new_residual is None else grad_new_residual
            cotangent = (cotangent, put(g_r))
        grad_x, grad_weight, *grad_residual = (np.asarray(g) for g in vjp(cotangent))
        return (grad_x, *grad_residual, grad_weight)

    return run


def _jax_fp8_runner(interpret: bool, pallas_backend: str) -> Fp8Fn:
    """bi_jax.rms_norm(..., out_dtype=jnp.float8_e4m3fn, scale=<float32 jax array> | group_size=...)."""
    import jax.numpy as jnp

    import bi_jax

    _needs_out_dtype(bi_jax.rms_norm, "bi_jax.rms_norm")
    put = _jax_put(interpret)

    def run(x, weight, eps, residual, mode, weight_offset, quantization):
        kwargs = {"out_dtype": jnp.dtype(quantization["out_dtype"])}
        if "scale" in quantization:
            kwargs["scale"] = put(np.asarray(quantization["scale"], np.float32))
        else:
            kwargs["group_size"] = quantization["group_size"]
        result = bi_jax.rms_norm(put(x), put(weight), eps, None if residual is None else put(residual), mode=mode,
                                 weight_offset=weight_offset, interpret=interpret, pallas_backend=pallas_backend,
                                 **kwargs)
        parts = split_fp8(result, "group_size" in quantization, residual is not None)
        return tuple(None if a is None else np.asarray(a) for a in parts)

    return run


BACKENDS: List[Backend] = [
    Backend("reference", "numpy float32 reference (bridge.reference)", lambda: None,
            lambda: lambda x, w, eps, r, mode, off: reference.rms_norm(x, w, eps, r, mode=mode, weight_offset=off),
            lambda: _reference_backward, make_fp8_runner=lambda: _reference_fp8),
    Backend("triton-interpret", "bi_torch on CPU tensors (Triton interpreter)",
            lambda: _torch_probe("cpu"), lambda: _torch_runner("cpu"), lambda: _torch_backward_runner("cpu"),
            make_fp8_runner=lambda: _torch_fp8_runner("cpu")),
    Backend("triton-gpu", "bi_torch on CUDA tensors (compiled Triton)",
            lambda: _torch_probe("cuda"), lambda: _torch_runner("cuda"), lambda: _torch_backward_runner("cuda"),
            make_fp8_runner=lambda: _torch_fp8_runner("cuda")),
    # bi_jax's interpret mode is the Pallas-Triton body, named explicitly so that
    # BI_NORM_PALLAS_BACKEND (bi_jax.selection) cannot change what a row runs.
    Backend("pallas-interpret", "bi_jax with interpret=True on CPU (the Pallas-Triton body)",
            lambda: _jax_probe(True), lambda: _jax_runner(True, "triton"), lambda: _jax_backward_runner(True, "triton"),
            flushes_subnormals=True, make_fp8_runner=lambda: _jax_fp8_runner(True, "triton")),
    Backend("pallas-triton-gpu", "bi_jax compiled Pallas-Triton on GPU (pallas_backend='triton')",
            lambda: _jax_probe(False), lambda: _jax_runner(False, "triton"),
            lambda: _jax_backward_runner(False, "triton"), make_fp8_runner=lambda: _jax_fp8_runner(False, "triton")),
    # The forward, the backward and the FP8 output (issue 26, stages 1-3), rows of up to MAX_N columns.
    Backend("pallas-mosaic-gpu",
            "bi_jax compiled Pallas Mosaic GPU forward, backward and FP8 output (pallas_backend='mosaic')",
            _mosaic_probe, lambda: _jax_runner(False, "mosaic"), lambda: _jax_backward_runner(False, "mosaic"),
            make_fp8_runner=lambda: _jax_fp8_runner(False, "mosaic"), max_n=_mosaic_max_n),
]

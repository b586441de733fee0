"""Zero-copy hand-over of arrays between PyTorch and JAX through DLPack, with checks first.

`to_jax(t)` and `to_torch(a)` give the other framework a view of the same device memory: no
copy and no host round trip. Everything DLPack or the importer cannot carry faithfully (a
tensor that requires grad, a layout JAX cannot express, a device or dtype the other framework
lacks) raises a TypeError or ValueError naming the argument before any conversion starts.

Stream ordering is the DLPack protocol's: the consumer passes its stream to the producer's
`__dlpack__`, and the producer makes that stream wait for the work queued so far on the
producer's *current* stream. So the stream that wrote the data must be current when you
convert: run `to_jax(t)` inside the same `with torch.cuda.stream(s):` block that wrote `t`
(or synchronise `s` first). In the other direction JAX orders its own work.

Importing this module applies the GPU memory policy of `share_gpu_with_torch` (below). It
imports neither torch nor jax itself, so that the policy is in place before JAX starts.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import TYPE_CHECKING, Tuple

if TYPE_CHECKING:
    import jax
    import torch

PREALLOCATE_VAR = "XLA_PYTHON_CLIENT_PREALLOCATE"

# XLA's CPU runtime wants 64-byte-aligned buffers; jax.dlpack copies a CPU buffer that is not
# (a view at an odd offset into a larger tensor). torch's CPU allocator aligns to 64 bytes.
JAX_CPU_ALIGNMENT = 64

# Dtypes both frameworks have and DLPack carries unchanged in both directions (same name in
# torch and jax). torch's int1..int7 / uint1..uint7 would arrive as int8 / uint8, JAX's int4,
# float8_e3m4, float4_e2m1fn... have no DLPack code torch reads, and torch.complex32 none JAX reads.
DTYPE_NAMES: Tuple[str, ...] = (
    "bool", "int8", "int16", "int32", "uint8", "uint16", "uint32", "float16", "bfloat16", "float32", "complex64",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
)
# Only with jax_enable_x64: otherwise JAX would silently narrow them to 32 bits (a copy).
X64_DTYPE_NAMES: Tuple[str, ...] = ("int64", "uint64", "float64", "complex128")


def share_gpu_with_torch() -> None:
    """Stop JAX from preallocating GPU memory, so that PyTorch in the same process gets its share.

    By default JAX reserves 75% of each GPU's memory when it first uses it, which leaves PyTorch
    (and its caching allocator) short. This sets XLA_PYTHON_CLIENT_PREALLOCATE=false, unless the
    variable is already set, in which case your choice stands. JAX then allocates on demand (it
    still keeps what it has used for reuse; XLA_PYTHON_CLIENT_MEM_FRACTION caps it).

    The variable is read once, when JAX initialises its GPU backend. Importing this module
    (`from bridge import dlpack`) calls this function, so import it before JAX first touches the
    GPU (before `jax.devices()` or the first computation). If JAX's GPU backend is already up and
    the variable was unset, it is too late: a RuntimeWarning says so, and the fix is to import it
    earlier or to export XLA_PYTHON_CLIENT_PREALLOCATE=false before starting Python.
    """
    if PREALLOCATE_VAR in os.environ:
        return
    os.environ[PREALLOCATE_VAR] = "false"
    if _jax_gpu_backend_initialised():
        warnings.warn(
            "JAX's GPU backend was initialised before bridge.interop.dlpack was imported, with "
            f"{PREALLOCATE_VAR} unset: JAX has already reserved 75% of GPU memory, which starves PyTorch. "
            f"Import it (`from bridge import dlpack`) before JAX first uses the GPU, or export "
            f"{PREALLOCATE_VAR}=false.",
            RuntimeWarning, stacklevel=2)


def _jax_gpu_backend_initialised() -> bool:
    """Whether JAX has already started a GPU backend; never starts one itself (nor imports jax)."""
    if "jax" not in sys.modules:
        return False
    import jax
    from jax._src import xla_bridge

    # jax.devices() would initialise the backends; only ask once they are up anyway.
    return xla_bridge.backends_are_initialized() and any(d.platform == "gpu" for d in jax.devices())


share_gpu_with_torch()


def _jax_dtype_names() -> Tuple[str, ...]:
    import jax

    return DTYPE_NAMES + (X64_DTYPE_NAMES if jax.config.jax_enable_x64 else ())


def _compact_layout(shape: Tuple[int, ...], strides: Tuple[int, ...]) -> bool:
    """The layouts jax.dlpack imports: a permutation of a dense row-major array (jaxlib's rule).

    Dimensions are ordered by stride (ties: the later dimension is the more minor); each one
    longer than 1 must then have the product of the more minor sizes as its stride. So
    transposes pass; gaps (slices with a step, a sub-block of rows) and broadcasts (stride 0) fail.
    """
    if 0 in shape:
        return True
    expected = 1
    for d in sorted(range(len(shape)), key=lambda d: (strides[d], -d)):
        if shape[d] > 1 and strides[d] != expected:
            return False
        expected *= shape[d]
    return True


def _jax_device_for(t: torch.Tensor) -> jax.Device:
    """The JAX device that will hold t's memory, or a ValueError naming what is missing."""
    import jax
    import torch

    kind = t.device.type
    if kind == "cuda":
        platform, index = ("rocm" if torch.version.hip else "cuda"), t.device.index or 0
    elif kind == "cpu":
        if t.is_pinned():
            # DLPack calls pinned memory a CUDA-host device: JAX would make it a GPU array in pinned_host memory.
            raise ValueError("t: a pinned CPU tensor, which JAX would import as a GPU array (pinned_host memory), "
                             "not a CPU one. Pass an unpinned tensor (t.clone()) or move it to the GPU.")
        platform, index = "cpu", 0
    else:
        where = "the meta device holds no data" if kind == "meta" else "JAX imports only CPU and CUDA memory"
        raise ValueError(f"t: a tensor on {t.device}; {where}.")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise ValueError(f"t: a tensor on {t.device}, but JAX has no {platform} backend "
                         f"(its devices: {jax.devices()}). Install a JAX build for it, or move t to a device "
                         f"JAX sees (a copy).") from None
    for device in devices:
        if device.local_hardware_id == index:
            return device
    raise ValueError(f"t: a tensor on {t.device}, but JAX sees no {platform} device with hardware id {index} "
                     f"(its devices: {devices}).")


def to_jax(t: torch.Tensor, *, allow_copy: bool = True) -> jax.Array:
    """A jax.Array on the tensor's device that shares the tensor's memory (DLPack; no copy).

    The one case JAX copies: a CPU tensor whose data pointer is not 64-byte aligned (a view
    at an offset into a larger tensor); `allow_copy=False` turns that case into a ValueError.
    CUDA memory is handed over as it is.

    The stream that wrote `t` must be torch's current stream at this call (see the module
    docstring). A tensor that requires grad is refused, not detached: DLPack carries no
    autograd history, so pass `t.detach()` if that is what you mean. Writing into `t` while
    JAX uses the array is undefined behaviour (JAX assumes its arrays are immutable).
    """
    import jax
    import jax.dlpack
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t: expected a torch.Tensor; got {type(t).__name__}")
    if t.requires_grad:
        raise ValueError("t: requires grad, and DLPack carries no autograd history; pass t.detach() "
                         "(the same memory, without the graph).")
    if t.layout != torch.strided:
        raise ValueError(f"t: layout {t.layout}; DLPack carries only dense (torch.strided) tensors. "
                         f"Pass t.to_dense().")
    if t.is_conj() or t.is_neg():
        raise ValueError("t: a lazily conjugated or negated view, which DLPack cannot express; "
                         "pass t.resolve_conj().resolve_neg().")
    name = str(t.dtype).replace("torch.", "")
    if name not in _jax_dtype_names():
        hint = " (enable jax_enable_x64 for 64-bit dtypes)" if name in X64_DTYPE_NAMES else ""
        raise TypeError(f"t: dtype {t.dtype} has no JAX counterpart through DLPack{hint}; "
                        f"supported: {', '.join(_jax_dtype_names())}.")
    device = _jax_device_for(t)
    if not _compact_layout(tuple(t.shape), tuple(t.stride())):
        raise ValueError(f"t: JAX imports only dense layouts (a permutation of row-major); got shape "
                         f"{tuple(t.shape)} with strides {tuple(t.stride())}. Pass t.contiguous() (a copy).")
    if not allow_copy and device.platform == "cpu" and t.numel() and t.data_ptr() % JAX_CPU_ALIGNMENT:
        raise ValueError(f"t: its CPU data is not {JAX_CPU_ALIGNMENT}-byte aligned, so JAX must copy it, "
                         f"but allow_copy=False. Pass t.clone() (an aligned copy) or allow_copy=True.")
    # torch exports only from the current CUDA device.
    on_device = torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        return jax.dlpack.from_dlpack(t, copy=None if allow_copy else False)


def to_torch(a: jax.Array) -> torch.Tensor:
    """A torch.Tensor on the array's device that shares the array's memory (DLPack; never a copy).

    torch's current stream waits for the computation that produces `a` (JAX orders it).
    The array must be concrete (not a tracer inside jax.jit) and on a single device. JAX
    assumes its arrays are immutable: do not write into the returned tensor while JAX may read `a`.
    """
    import jax
    import torch

    if isinstance(a, jax.core.Tracer):
        raise TypeError("a: a traced value (inside jax.jit, vmap or grad); to_torch needs a concrete jax.Array.")
    if not isinstance(a, jax.Array):
        raise TypeError(f"a: expected a jax.Array; got {type(a).__name__}")
    if a.is_deleted():
        raise ValueError("a: its buffer was deleted (donated or freed).")
    devices = a.devices()
    if len(devices) != 1:
        raise ValueError(f"a: spread over {len(devices)} devices; to_torch takes a single-device array "
                         f"(one shard: a.addressable_shards[i].data).")
    (device,) = devices
    name = a.dtype.name
    if name not in DTYPE_NAMES + X64_DTYPE_NAMES or getattr(torch, name, None) is None:
        raise TypeError(f"a: dtype {name} has no torch counterpart through DLPack; "
                        f"supported: {', '.join(DTYPE_NAMES + X64_DTYPE_NAMES)}.")
    if device.platform == "gpu":
        if not torch.cuda.is_available() or device.local_hardware_id >= torch.cuda.device_count():
            raise ValueError(f"a: on {device}, a GPU this torch build cannot address "
                             f"(torch.cuda.is_available() = {torch.cuda.is_available()}).")
    elif device.platform != "cpu":
        raise ValueError(f"a: on {device} ({device.platform}); torch imports only CPU and CUDA memory.")
    return torch.from_dlpack(a)

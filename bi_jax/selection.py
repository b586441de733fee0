"""Which kernel body runs bi_jax's forward and backward: Mosaic GPU (bi_jax/mosaic_kernel.py,
bi_jax/mosaic_backward.py) or Pallas-Triton.

The choice: `pallas_backend=` of bi_jax.rms_norm, else the environment variable
BI_NORM_PALLAS_BACKEND (read at each call of bi_jax.rms_norm: under jax.jit, when it is traced),
else "auto".

- "auto": Mosaic GPU where it can run (compiled on a GPU of compute capability 9.0 or later, a
  jax that has every API the kernel uses, rows of at most mosaic_kernel.MAX_N columns), else
  Pallas-Triton; on a GPU, with a one-time PallasBackendWarning that says why.
- "mosaic": Mosaic GPU, or a ValueError that says why it cannot run here.
- "triton": Pallas-Triton.

The forward (issue 26, stage 1), its FP8 output (stage 3, bi_jax/mosaic_fp8.py) and the
backward (stage 2) have Mosaic GPU kernels, chosen by the same rule. Interpret mode (the CPU) is
always the Pallas-Triton body: Mosaic GPU's interpreter has no rule for inline_mgpu.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from typing import Optional, Tuple

import jax

from .mosaic_kernel import MAX_N, SEMANTICS

ENV_VAR = "BI_NORM_PALLAS_BACKEND"
CHOICES = ("auto", "mosaic", "triton")
# Mosaic GPU compiles for Hopper (sm_90a) and later.
MIN_CAPABILITY = (9, 0)


class PallasBackendWarning(UserWarning):
    """bi_jax runs Pallas-Triton on a GPU because its Mosaic GPU kernel cannot run there."""


def requested(pallas_backend: Optional[str]) -> Tuple[str, str]:
    """(the choice, where it came from): pallas_backend, else $BI_NORM_PALLAS_BACKEND, else "auto"."""
    if pallas_backend is not None:
        value, source = pallas_backend, "pallas_backend"
    else:
        value, source = os.environ.get(ENV_VAR, "") or "auto", ENV_VAR
    if not isinstance(value, str) or value.strip().lower() not in CHOICES:
        raise ValueError(f"{source}: expected one of {', '.join(map(repr, CHOICES))}; got {value!r}")
    return value.strip().lower(), source


@functools.lru_cache(maxsize=None)
def jax_lacks() -> Optional[str]:
    """Why the installed jax cannot build the Mosaic GPU kernel, or None: every API it uses is there."""
    try:
        from jax.experimental.mosaic.gpu import utils
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError as e:
        return f"jax {jax.__version__} has no Mosaic GPU Pallas ({e})"
    missing = [f"plgpu.{name}" for name in ("inline_mgpu", "RefType", "kernel", "Mesh", "SMEM", "CompilerParams")
               if not hasattr(plgpu, name)]
    if not hasattr(getattr(plgpu, "LoweringSemantics", None), SEMANTICS):
        missing.append(f"plgpu.LoweringSemantics.{SEMANTICS}")
    if hasattr(plgpu, "kernel"):
        # out_type= and scratch_types= arrived in jax 0.10.2 (before: out_shape=, scratch_shapes=).
        params = inspect.signature(plgpu.kernel).parameters
        missing += [f"plgpu.kernel({p}=)" for p in ("out_type", "scratch_types", "grid_names") if p not in params]
    missing += [f"mosaic.gpu.utils.{name}" for name in ("shfl_bfly", "when", "warpgroup_barrier")
                if not hasattr(utils, name)]
    try:  # the primitive plgpu.kernel lowers through, which bi_jax.mosaic_call hands its aliases
        from jax._src.pallas.mpmd import _mpmd_map
    except ImportError:
        missing.append("jax._src.pallas.mpmd._mpmd_map")
    else:
        if "input_output_aliases" not in inspect.signature(_mpmd_map).parameters:
            missing.append("jax._src.pallas.mpmd._mpmd_map(input_output_aliases=)")
    from jax._src import config  # mosaic_call turns its _check_vma off around the call, as plgpu.kernel does
    if not hasattr(config, "_check_vma"):
        missing.append("jax._src.config._check_vma")
    if missing:
        return f"jax {jax.__version__} lacks {', '.join(missing)} (the Mosaic GPU kernel needs jax 0.10.2 or later)"
    return None


@functools.lru_cache(maxsize=None)
def gpu_lacks() -> Optional[str]:
    """Why JAX's first GPU cannot run the Mosaic GPU kernel, or None: compute capability 9.0 or later."""
    try:
        device = jax.local_devices(backend="gpu")[0]
    except RuntimeError:
        return "JAX sees no GPU"
    capability = getattr(device, "compute_capability", None)
    try:
        version = tuple(int(part) for part in str(capability).split(".")[:2])
    except ValueError:
        version = None
    if capability is None or version is None or len(version) != 2:
        return f"{device.device_kind} has no CUDA compute capability (Mosaic GPU runs on NVIDIA GPUs)"
    if version < MIN_CAPABILITY:
        return (f"{device.device_kind} has compute capability {capability}; the Mosaic GPU kernel needs "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Hopper) or later")
    return None


def mosaic_unavailable(n: int, interpret: bool) -> Tuple[Optional[str], str]:
    """(why the Mosaic GPU kernel cannot run a call on rows of n columns, or None; a short key for
    the reason's kind, which the one-time warning is keyed on)."""
    if interpret:
        return ("interpret mode runs the Pallas-Triton body (Mosaic GPU's interpreter has no rule for "
                "inline_mgpu)"), "interpret"
    for key, check in (("jax", jax_lacks), ("gpu", gpu_lacks)):
        reason = check()
        if reason is not None:
            return reason, key
    if n > MAX_N:
        return (f"rows of {n} columns: the Mosaic GPU kernel holds a row in registers, up to {MAX_N} "
                f"columns"), "wide"
    return None, ""


_warned = set()


def _warn_once(key: str, reason: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"bi_jax runs its Pallas-Triton kernel, not the Mosaic GPU one: {reason}. Choose it "
                      f"explicitly (pallas_backend='triton' or {ENV_VAR}=triton) to silence this warning.",
                      PallasBackendWarning, stacklevel=4)


def forward_kernel(pallas_backend: Optional[str], n: int, interpret: bool) -> str:
    """"mosaic" or "triton": the body that runs a forward call, FP8 output or not (see the module docstring)."""
    choice, source = requested(pallas_backend)
    if choice == "triton":
        return "triton"
    reason, key = mosaic_unavailable(n, interpret)
    if reason is None:
        return "mosaic"
    if choice == "mosaic":
        raise ValueError(f"{source}='mosaic': the Mosaic GPU kernel cannot run this call: {reason}")
    if not interpret:
        _warn_once(key, reason)
    return "triton"


def backward_kernel(pallas_backend: Optional[str], n: int, interpret: bool) -> str:
    """"mosaic" or "triton": the body that runs the backward of a (non-FP8) forward call, by the
    forward's rule (both Mosaic kernels hold rows of up to MAX_N columns); either gives the same bits."""
    return forward_kernel(pallas_backend, n, interpret)

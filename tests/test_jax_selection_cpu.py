"""bi_jax.selection on the CPU: which kernel body runs the forward, with the GPU and jax mocked.

The choice's sources (pallas_backend=, BI_NORM_PALLAS_BACKEND, "auto"), the default on a GPU of
each compute capability, the errors of an explicit "mosaic" that cannot run, and the one-time
warning when "auto" falls back to Pallas-Triton on a GPU.
"""

from __future__ import annotations

import types
import warnings

import jax
import jax.numpy as jnp
import pytest

import bi_jax
from bi_jax import mosaic_kernel, selection
from bi_jax.selection import ENV_VAR, PallasBackendWarning, forward_kernel, requested


# The cached checks themselves (tests replace the module's names with stubs).
CHECKS = (selection.gpu_lacks, selection.jax_lacks)


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """No variable from the environment, no warning already given, no cached answer about the GPU."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(selection, "_warned", set())
    for check in CHECKS:
        check.cache_clear()
    yield
    for check in CHECKS:
        check.cache_clear()


@pytest.fixture
def hopper(monkeypatch):
    """A GPU that can run the Mosaic kernel, and a jax that has what it needs."""
    monkeypatch.setattr(selection, "gpu_lacks", lambda: None)
    monkeypatch.setattr(selection, "jax_lacks", lambda: None)


def _devices(monkeypatch, **attrs):
    device = types.SimpleNamespace(device_kind="Some GPU", **attrs)
    monkeypatch.setattr(jax, "local_devices", lambda backend=None: [device])


# --------------------------------------------------------------------------------------------
# Where the choice comes from.
# --------------------------------------------------------------------------------------------


def test_the_default_is_auto():
    assert requested(None) == ("auto", ENV_VAR)


@pytest.mark.parametrize("value,want", [("triton", "triton"), (" Mosaic ", "mosaic"), ("AUTO", "auto"), ("", "auto")])
def test_the_environment_variable(monkeypatch, value, want):
    monkeypatch.setenv(ENV_VAR, value)
    assert requested(None)[0] == want


def test_the_argument_overrides_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "mosaic")
    assert requested("triton") == ("triton", "pallas_backend")


def test_a_bad_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=f"{ENV_VAR}: expected one of 'auto', 'mosaic', 'triton'; got 'cuda'"):
        requested(None)


@pytest.mark.parametrize("value", ["mosiac", 1, True])
def test_a_bad_argument_is_named(value):
    with pytest.raises(ValueError, match="pallas_backend: expected one of"):
        requested(value)


def test_rms_norm_names_a_bad_argument():
    with pytest.raises(ValueError, match="pallas_backend: expected one of"):
        bi_jax.rms_norm(jnp.ones((2, 8)), jnp.ones(8), pallas_backend="gpu")


# --------------------------------------------------------------------------------------------
# What each choice runs.
# --------------------------------------------------------------------------------------------


def test_mosaic_by_default_on_a_hopper_gpu(hopper):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert forward_kernel(None, 4096, interpret=False) == "mosaic"
        assert forward_kernel(None, mosaic_kernel.MAX_N, interpret=False) == "mosaic"
        assert forward_kernel("mosaic", 1, interpret=False) == "mosaic"


def test_triton_when_chosen(hopper, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert forward_kernel("triton", 4096, interpret=False) == "triton"
        monkeypatch.setenv(ENV_VAR, "triton")
        assert forward_kernel(None, 4096, interpret=False) == "triton"


def test_interpret_mode_is_the_triton_body_without_a_warning(hopper):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert forward_kernel(None, 4096, interpret=True) == "triton"
    with pytest.raises(ValueError, match="pallas_backend='mosaic': .*interpret mode .*inline_mgpu"):
        forward_kernel("mosaic", 4096, interpret=True)


def test_mosaic_on_this_cpu_raises_naming_the_source(monkeypatch):
    x, w = jnp.ones((2, 8)), jnp.ones(8)
    with pytest.raises(ValueError, match="pallas_backend='mosaic': the Mosaic GPU kernel cannot run"):
        bi_jax.rms_norm(x, w, pallas_backend="mosaic")
    monkeypatch.setenv(ENV_VAR, "mosaic")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='mosaic': the Mosaic GPU kernel cannot run"):
        bi_jax.rms_norm(x, w)
    # The FP8 output follows the same choice (issue 26, stage 3).
    with pytest.raises(ValueError, match=f"{ENV_VAR}='mosaic': the Mosaic GPU kernel cannot run"):
        bi_jax.rms_norm(x, w, out_dtype=jnp.float8_e4m3fn, scale=1.0)


def test_wide_rows_fall_back_with_one_warning(hopper):
    n = mosaic_kernel.MAX_N + 1
    with pytest.warns(PallasBackendWarning, match=f"rows of {n} columns: .* up to {mosaic_kernel.MAX_N} columns"):
        assert forward_kernel(None, n, interpret=False) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert forward_kernel(None, 2 * n, interpret=False) == "triton"
    with pytest.raises(ValueError, match=f"pallas_backend='mosaic': .*rows of {n} columns"):
        forward_kernel("mosaic", n, interpret=False)


def test_an_older_gpu_falls_back_with_one_warning_per_reason(monkeypatch):
    _devices(monkeypatch, compute_capability="8.0")
    monkeypatch.setattr(selection, "jax_lacks", lambda: None)
    with pytest.warns(PallasBackendWarning, match=r"compute capability 8\.0; the Mosaic GPU kernel needs 9\.0") as got:
        assert forward_kernel(None, 4096, interpret=False) == "triton"
    assert "pallas_backend='triton' or BI_NORM_PALLAS_BACKEND=triton" in str(got[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert forward_kernel(None, 100, interpret=False) == "triton"  # the same reason: once
        assert forward_kernel("triton", 100, interpret=False) == "triton"
    with pytest.raises(ValueError, match=r"compute capability 8\.0"):
        forward_kernel("mosaic", 4096, interpret=False)


@pytest.mark.parametrize("capability,ok", [("9.0", True), ("10.0", True), ("12.0", True), ("8.9", False),
                                           ("7.5", False), (None, False), ("gfx90a", False)])
def test_gpu_lacks_by_compute_capability(monkeypatch, capability, ok):
    _devices(monkeypatch, **({} if capability is None else {"compute_capability": capability}))
    reason = selection.gpu_lacks()
    assert (reason is None) == ok, reason
    if capability is None or capability == "gfx90a":
        assert "has no CUDA compute capability" in reason


def test_gpu_lacks_without_a_gpu():
    assert selection.gpu_lacks() == "JAX sees no GPU"  # this machine: JAX has only its CPU backend


def test_this_jax_has_what_the_mosaic_kernel_uses():
    assert selection.jax_lacks() is None, selection.jax_lacks()


def test_jax_lacks_names_what_is_missing(monkeypatch):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    monkeypatch.delattr(plgpu, "inline_mgpu")
    kernel = plgpu.kernel
    monkeypatch.setattr(plgpu, "kernel", lambda body, out_shape=None, *, scratch_shapes=(), grid=(), grid_names=():
                        kernel)
    reason = selection.jax_lacks()
    assert reason is not None and "plgpu.inline_mgpu" in reason, reason
    assert "plgpu.kernel(out_type=)" in reason and "plgpu.kernel(scratch_types=)" in reason
    assert "jax 0.10.2 or later" in reason


def test_jax_lacks_a_mosaic_gpu_pallas(monkeypatch):
    import sys

    import jax.experimental.pallas as pallas

    monkeypatch.delattr(pallas, "mosaic_gpu", raising=False)
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.mosaic_gpu", None)  # a jax without it
    reason = selection.jax_lacks()
    assert reason is not None and reason.startswith(f"jax {jax.__version__} has no Mosaic GPU Pallas"), reason


def test_jax_lacks_the_mpmd_map_primitive_with_aliases(monkeypatch):
    import jax._src.pallas.mpmd as mpmd

    monkeypatch.setattr(mpmd, "_mpmd_map", lambda meshes_and_fns, out_types=(), *, scratch_types=(): None)
    reason = selection.jax_lacks()
    assert reason is not None and "jax._src.pallas.mpmd._mpmd_map(input_output_aliases=)" in reason, reason
    monkeypatch.delattr(mpmd, "_mpmd_map")
    selection.jax_lacks.cache_clear()
    reason = selection.jax_lacks()
    assert reason is not None and "jax._src.pallas.mpmd._mpmd_map" in reason, reason


def test_jax_lacks_the_vma_switch(monkeypatch):
    from jax._src import config

    monkeypatch.delattr(config, "_check_vma")
    reason = selection.jax_lacks()
    assert reason is not None and "jax._src.config._check_vma" in reason, reason

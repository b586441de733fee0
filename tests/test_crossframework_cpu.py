"""bridge.interop.crossframework (and bridge.interop.device, .backward, .fp8) on the CPU: each framework's
kernel on the other's arrays, forward, backward and FP8 output, bit for bit against the reference
and the kernel's own framework, and how a difference is reported. (bridge.interop.dlpack itself:
test_bridge_cpu.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

import bi_jax
import bi_torch
from bridge import golden, reference
from bridge.interop import (backward as crossframework_backward, crossframework, device as crossframework_device,
                            fp8 as crossframework_fp8)
from bridge.numerics.subnormals import flushed
from bridge.verify.compare import assert_bitwise_equal
from bridge_helpers import jax_on_the_cpu  # noqa: F401 (an autouse fixture: JAX on the CPU)
from bridge_helpers import cross_inputs, numpy_of_torch, random_bits, torch_from_numpy
from torch_helpers import seeded_rng

# The interpreters evaluate special values (inf, NaN) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


# ---------------------------------------------------------------- kernels across frameworks


def _inputs(dtype: str, residual: str, shape=(2, 3, 100)):
    return cross_inputs(seeded_rng("xf", dtype, residual, shape), dtype, residual, shape)


CROSS_CASES = [("float32", "none", "llama", 0.0), ("float32", "float32", "fp32", 1.0),
               ("bfloat16", "none", "fp32", 0.0), ("bfloat16", "same", "llama", 1.0),
               ("bfloat16", "float32", "llama", 0.0), ("float16", "same", "fp32", 1.0),
               ("float16", "float32", "llama", 1.0)]


@pytest.mark.parametrize("dtype,residual,mode,offset", CROSS_CASES)
def test_torch_kernel_on_jax_arrays(dtype, residual, mode, offset):
    x, w, r = _inputs(dtype, residual)
    expected = reference.rms_norm(x, w, 1e-6, r, mode=mode, weight_offset=offset)
    own = bi_torch.rms_norm(torch_from_numpy(x), torch_from_numpy(w), 1e-6, None if r is None else torch_from_numpy(r),
                            mode=mode, weight_offset=offset)
    got = crossframework.torch_rms_norm_on_jax(jnp.asarray(x), jnp.asarray(w), 1e-6,
                                               None if r is None else jnp.asarray(r), mode=mode, weight_offset=offset)
    if r is None:
        expected, own, got = (expected,), (own,), (got,)
    for what, e, o, g in zip(("out", "new_residual"), expected, own, got):
        assert isinstance(g, jax.Array) and g.devices() == {jax.devices("cpu")[0]}
        assert_bitwise_equal(e, np.asarray(g), f"{what} vs reference")
        assert_bitwise_equal(numpy_of_torch(o), np.asarray(g), f"{what} vs bi_torch")


@pytest.mark.parametrize("dtype,residual,mode,offset", CROSS_CASES)
def test_jax_kernel_on_torch_tensors(dtype, residual, mode, offset):
    x, w, r = _inputs(dtype, residual)
    expected = reference.rms_norm(x, w, 1e-6, r, mode=mode, weight_offset=offset)
    own = bi_jax.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6, None if r is None else jnp.asarray(r), mode=mode,
                          weight_offset=offset)
    got = crossframework.jax_rms_norm_on_torch(torch_from_numpy(x), torch_from_numpy(w), 1e-6,
                                               None if r is None else torch_from_numpy(r), mode=mode,
                                               weight_offset=offset)
    if r is None:
        expected, own, got = (expected,), (own,), (got,)
    for what, e, o, g in zip(("out", "new_residual"), expected, own, got):
        assert isinstance(g, torch.Tensor) and g.device.type == "cpu"
        assert_bitwise_equal(e, numpy_of_torch(g), f"{what} vs reference")
        assert_bitwise_equal(np.asarray(o), numpy_of_torch(g), f"{what} vs bi_jax")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_best_device_is_the_cpu_without_a_gpu():
    assert crossframework_device.best_device() == "cpu"


def test_cross_check_agrees_on_golden_cases(corpus):
    assert crossframework_device.probe() is None
    cases = [c for c in corpus if c.spec.n == 100]  # every dtype and residual kind, all special-value rows
    assert len(cases) == 8
    for case in cases:
        for mode, offset in case.out:
            problem = crossframework.cross_check(case.x, case.weight, case.spec.eps, case.residual, mode, offset,
                                                 device="cpu")
            assert problem is None, f"{case.spec.name} {mode}/{offset:g}: {problem}"


def test_cross_check_reports_the_first_difference(monkeypatch):
    x, w, r = _inputs("bfloat16", "float32", shape=(3, 100))
    honest = crossframework._bi_jax

    def perturbed(*args):
        out, new_residual = honest(*args)
        return out.at[1, 42].set(out[1, 42] * 2), new_residual

    monkeypatch.setattr(crossframework, "_bi_jax", perturbed)
    problem = crossframework.cross_check(x, w, 1e-6, r, "llama", 0.0, device="cpu")
    assert problem is not None and problem.startswith("out: 1 of 300 elements differ; first at index (1, 42): torch ")
    assert ", jax " in problem


def test_first_bit_difference_compares_bits_and_names_the_index():
    bits = random_bits(seeded_rng("fbd"), (4, 8), "bfloat16")
    flipped = bits.copy()
    flipped.view(np.uint16)[2, 5] ^= 0x8000  # the sign bit: a different pattern whatever the value
    a, b = jnp.asarray(bits), jnp.asarray(flipped)
    assert crossframework_device.first_bit_difference(a, jnp.array(a, copy=True)) is None
    problem = crossframework_device.first_bit_difference(a, b, labels=("torch", "jax"))
    old, new = bits.view(np.uint16)[2, 5], flipped.view(np.uint16)[2, 5]
    assert problem == (f"1 of 32 elements differ; first at index (2, 5): torch {a[2, 5].item()!r} (0x{old:04x}), "
                       f"jax {b[2, 5].item()!r} (0x{new:04x})")
    # Bits, not values: NaN equals the same NaN, and +0 differs from -0.
    nan = jnp.asarray(np.array([np.nan, 0.0], np.float32))
    assert crossframework_device.first_bit_difference(nan, nan) is None
    assert crossframework_device.first_bit_difference(nan, nan.at[1].set(-0.0)) == (
        "1 of 2 elements differ; first at index (1,): a 0.0 (0x00000000), b -0.0 (0x80000000)")
    assert crossframework_device.first_bit_difference(a, a[:2]) == "a is bfloat16[4, 8], b is bfloat16[2, 8]"


# ---------------------------------------------------------------- gradients across frameworks


@pytest.mark.parametrize("dtype,residual,mode,offset", CROSS_CASES)
def test_cross_check_backward_agrees_with_the_reference(dtype, residual, mode, offset):
    x, w, r = _inputs(dtype, residual)
    g = _inputs(dtype, "none")[0][::-1].copy()  # another array of x's shape and dtype
    gr = None if r is None or residual == "same" else (r * np.float32(0.5)).astype(r.dtype)
    assert crossframework.cross_check_backward(x, w, g, 1e-6, r, gr, mode, offset, device="cpu") is None
    # And both sides are the contract's: torch's gradients equal the reference.
    expected = reference.rms_norm_backward(x.reshape(-1, 100), w, g.reshape(-1, 100), 1e-6,
                                           None if r is None else r.reshape(-1, 100),
                                           None if gr is None else gr.reshape(-1, 100), mode=mode,
                                           weight_offset=offset)
    got = crossframework_backward._bi_torch_backward(*(None if a is None else torch_from_numpy(a) for a in (x, w, g)),
                                                     1e-6, None if r is None else torch_from_numpy(r),
                                                     None if gr is None else torch_from_numpy(gr), mode, offset)
    for e, t in zip(expected, got):
        assert_bitwise_equal(e, numpy_of_torch(t).reshape(e.shape))


def test_cross_check_backward_on_golden_cases(backward_corpus):
    """Short-row cases without subnormals (XLA:CPU flushes them in interpret mode,
    bridge/numerics/subnormals.py): every residual kind, with and without grad_new_residual."""
    cases = {}  # the first such case of each (residual kind, grad_new_residual stored)
    for case in backward_corpus.values():
        (mode, offset) = next(iter(case.expected))
        rows, cols = flushed(case.x, case.weight, case.grad_out, case.spec.eps, case.residual,
                             case.grad_new_residual, mode, offset)
        if case.spec.n <= 129 and not rows.any() and not cols.any():
            cases.setdefault((case.spec.residual, case.spec.grad_new_residual), (case, mode, offset))
    assert set(cases) == {("none", False), ("same", False), ("same", True), ("float32", False), ("float32", True)}
    for case, mode, offset in cases.values():
        problem = crossframework.cross_check_backward(case.x, case.weight, case.grad_out, case.spec.eps, case.residual,
                                                      case.grad_new_residual, mode, offset, device="cpu")
        assert problem is None, f"{case.spec.name} {mode}/{offset:g}: {problem}"


def test_cross_check_backward_reports_the_first_difference(monkeypatch):
    x, w, r = _inputs("bfloat16", "float32", shape=(3, 100))
    g = _inputs("bfloat16", "none", shape=(3, 100))[0][::-1].copy()
    honest = crossframework_backward._bi_jax_backward

    def perturbed(*args):
        grad_x, grad_residual, grad_weight = honest(*args)
        return grad_x, grad_residual, grad_weight.at[7].set(-grad_weight[7])

    monkeypatch.setattr(crossframework_backward, "_bi_jax_backward", perturbed)
    problem = crossframework.cross_check_backward(x, w, g, 1e-6, r, None, "llama", 0.0, device="cpu")
    assert problem is not None and problem.startswith("grad_weight: 1 of 100 elements differ; first at index (7,): ")


# ---------------------------------------------------------------- FP8 output across frameworks

FP8 = "float8_e4m3fn"
# (dtype, residual, mode, offset, quantization): both scalings, every residual kind, 0-d and 1-element scales.
FP8_CROSS_CASES = [("float32", "none", "llama", 0.0, {"scale": np.array(0.02, np.float32)}),
                   ("bfloat16", "same", "fp32", 1.0, {"scale": np.array([1e-3], np.float32)}),
                   ("float16", "float32", "llama", 1.0, {"group_size": 64}),
                   ("bfloat16", "none", "llama", 0.0, {"group_size": 128})]


def _fp8_bits(a) -> np.ndarray:
    """The bits of a torch tensor, a JAX or a numpy array, FP8 ones as their uint8 codes."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
                                                  ).numpy().view(f"uint{8 * a.element_size()}")
    a = np.asarray(a)
    return np.ascontiguousarray(a).view(np.uint8) if a.dtype.itemsize == 1 else reference.bits(a)


def _as_tuple(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


@pytest.mark.parametrize("dtype,residual,mode,offset,quant", FP8_CROSS_CASES)
def test_torch_fp8_kernel_on_jax_arrays(dtype, residual, mode, offset, quant):
    x, w, r = _inputs(dtype, residual, shape=(3, 2, 128))
    expected = _as_tuple(reference.rms_norm(x, w, 1e-6, r, mode=mode, weight_offset=offset, out_dtype=FP8, **quant))
    kwargs = {"out_dtype": jnp.float8_e4m3fn, **{k: jnp.asarray(v) if k == "scale" else v for k, v in quant.items()}}
    got = _as_tuple(crossframework.torch_rms_norm_on_jax(jnp.asarray(x), jnp.asarray(w), 1e-6,
                                                         None if r is None else jnp.asarray(r), mode=mode,
                                                         weight_offset=offset, **kwargs))
    assert len(got) == len(expected) == 1 + ("group_size" in quant) + (r is not None)
    assert got[0].dtype == jnp.float8_e4m3fn and got[0].shape == x.shape
    for e, g in zip(expected, got):
        assert isinstance(g, jax.Array) and g.devices() == {jax.devices("cpu")[0]}
        np.testing.assert_array_equal(_fp8_bits(g), _fp8_bits(e))


@pytest.mark.parametrize("dtype,residual,mode,offset,quant", FP8_CROSS_CASES)
def test_jax_fp8_kernel_on_torch_tensors(dtype, residual, mode, offset, quant):
    x, w, r = _inputs(dtype, residual, shape=(3, 2, 128))
    expected = _as_tuple(reference.rms_norm(x, w, 1e-6, r, mode=mode, weight_offset=offset, out_dtype=FP8, **quant))
    kwargs = {"out_dtype": torch.float8_e4m3fn,
              **{k: torch.from_numpy(v.reshape(-1).copy()).reshape(v.shape) if k == "scale" else v
                 for k, v in quant.items()}}
    got = _as_tuple(crossframework.jax_rms_norm_on_torch(torch_from_numpy(x), torch_from_numpy(w), 1e-6,
                                                         None if r is None else torch_from_numpy(r), mode=mode,
                                                         weight_offset=offset, **kwargs))
    assert len(got) == len(expected) and got[0].dtype == torch.float8_e4m3fn
    for e, g in zip(expected, got):
        assert isinstance(g, torch.Tensor) and g.device.type == "cpu"
        np.testing.assert_array_equal(_fp8_bits(g), _fp8_bits(e))


def test_fp8_crosses_dlpack_as_itself_on_the_cpu():
    assert crossframework_fp8.fp8_probe() is None
    assert crossframework_fp8.fp8_dlpack_route("cpu") == "as float8_e4m3fn"
    t = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    a = crossframework_fp8._fp8_to_jax(t)
    assert a.dtype == jnp.float8_e4m3fn and a.unsafe_buffer_pointer() == t.data_ptr()  # zero copy
    back = crossframework_fp8._fp8_to_torch(a)
    assert back.dtype == torch.float8_e4m3fn and torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_fp8_falls_back_to_uint8_views_where_dlpack_refuses_it(monkeypatch):
    """Where DLPack carries no FP8 (some torch/jax builds on a GPU), the codes cross as uint8."""
    honest_to_jax, honest_to_torch = crossframework_fp8.to_jax, crossframework_fp8.to_torch

    def no_fp8_to_jax(t, **kwargs):
        if t.dtype == torch.float8_e4m3fn:
            raise TypeError("t: dtype torch.float8_e4m3fn has no JAX counterpart through DLPack")
        return honest_to_jax(t, **kwargs)

    def no_fp8_to_torch(a):
        if a.dtype == jnp.float8_e4m3fn:
            raise TypeError("a: dtype float8_e4m3fn has no torch counterpart through DLPack")
        return honest_to_torch(a)

    monkeypatch.setattr(crossframework_fp8, "to_jax", no_fp8_to_jax)
    monkeypatch.setattr(crossframework_fp8, "to_torch", no_fp8_to_torch)
    crossframework_fp8.fp8_dlpack_route.cache_clear()
    try:
        route = crossframework_fp8.fp8_dlpack_route("cpu")
        assert route.startswith("as uint8 views (torch -> jax: TypeError") and "jax -> torch: TypeError" in route
    finally:
        crossframework_fp8.fp8_dlpack_route.cache_clear()
    t = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    a = crossframework_fp8._fp8_to_jax(t)
    assert a.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.arange(256, dtype=np.uint8))
    back = crossframework_fp8._fp8_to_torch(a)
    assert back.dtype == torch.float8_e4m3fn and torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    x, w, r = _inputs("bfloat16", "float32", shape=(3, 128))
    assert crossframework_fp8.cross_check_fp8(x, w, 1e-6, r, "llama", 0.0, {"out_dtype": FP8, "group_size": 64},
                                              device="cpu") is None


def test_cross_check_fp8_agrees_on_golden_cases():
    """Short FP8 corpus cases: each scaling with each residual kind, the huge-weight cases (inf u)."""
    chosen = {}
    for case in golden.load_fp8_corpus():
        if case.spec.n <= 128:
            chosen.setdefault((case.spec.group_size is None, case.spec.residual, case.spec.weight), case)
    assert len(chosen) >= 7
    for case in chosen.values():
        mode, offset = case.spec.outputs[0]
        problem = crossframework_fp8.cross_check_fp8(case.x, case.weight, case.spec.eps, case.residual, mode, offset,
                                                     case.quantization(), device="cpu")
        assert problem is None, f"{case.spec.name} {mode}/{offset:g}: {problem}"


@pytest.mark.parametrize("what", ["out", "scales"])
def test_cross_check_fp8_reports_the_first_difference(monkeypatch, what):
    x, w, r = _inputs("float16", "same", shape=(3, 128))
    honest = crossframework_fp8._bi_jax

    def perturbed(*args, **kwargs):
        out, scales, new_residual = honest(*args, **kwargs)
        if what == "out":
            codes = lax.bitcast_convert_type(out, jnp.uint8)
            out = lax.bitcast_convert_type(codes.at[1, 42].set(codes[1, 42] ^ 1), jnp.float8_e4m3fn)
        else:
            scales = scales.at[2, 1].set(scales[2, 1] * 2)
        return out, scales, new_residual

    monkeypatch.setattr(crossframework_fp8, "_bi_jax", perturbed)
    problem = crossframework_fp8.cross_check_fp8(x, w, 1e-6, r, "fp32", 0.0, {"out_dtype": FP8, "group_size": 64},
                                                 device="cpu")
    where, total = ("(1, 42)", 384) if what == "out" else ("(2, 1)", 6)
    assert problem is not None
    assert problem.startswith(f"{what}: 1 of {total} elements differ; first at index {where}: torch ")

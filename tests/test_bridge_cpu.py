"""bridge.dlpack and bridge.crossframework on the CPU: zero-copy by buffer address, bits kept,
errors before any conversion, the GPU memory policy, and both kernels across frameworks.

Every numeric assertion is bitwise (integer views).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings
import zlib

import jax
import jax.dlpack
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

import bi_jax
import bi_torch
from bridge import crossframework, dlpack, reference
from bridge.compare import assert_bitwise_equal
from bridge.dlpack import to_jax, to_torch
from bridge.subnormals import flushed

# The interpreters evaluate special values (inf, NaN) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

DTYPES = ("float32", "bfloat16", "float16")
NUMPY = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
SHAPES = [(), (0,), (0, 4), (7,), (3, 5), (2, 3, 64)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _jax_on_the_cpu():
    """JAX arrays made here live on the CPU, as the torch tensors do, on any machine."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("|".join(map(str, parts)).encode()))


def random_bits(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    """Arbitrary bit patterns of `dtype`: NaN payloads, signed zeros, subnormals, infinities included."""
    width = NUMPY[dtype].itemsize
    ints = rng.integers(0, 2 ** (8 * width), size=shape, dtype=np.uint64).astype(f"uint{8 * width}")
    return ints.view(NUMPY[dtype])


def torch_from_numpy(a: np.ndarray) -> torch.Tensor:
    """A new torch tensor (torch's allocator: 64-byte aligned) with exactly a's bits."""
    ints = reference.bits(a).view({2: np.int16, 4: np.int32}[a.dtype.itemsize])
    return torch.tensor(ints).view(bi_torch.torch_dtype(reference.dtype_name(a.dtype)))


def torch_bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


def numpy_of_torch(t: torch.Tensor) -> np.ndarray:
    return torch_bits(t).view(NUMPY[bi_torch.dtype_name(t.dtype)])


def jax_bits(a: jax.Array) -> np.ndarray:
    return np.asarray(a).view(f"int{8 * a.dtype.itemsize}")


# ---------------------------------------------------------------- zero copy, bits, sharing


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_to_jax_is_zero_copy_and_keeps_bits(dtype, shape):
    t = torch_from_numpy(random_bits(_rng("t2j", dtype, shape), shape, dtype))
    a = to_jax(t)
    assert a.shape == tuple(t.shape) and a.dtype.name == dtype
    assert a.devices() == {jax.devices("cpu")[0]}
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(jax_bits(a), torch_bits(t).view(f"int{8 * t.element_size()}"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_jax_to_torch_is_zero_copy_and_keeps_bits(dtype, shape):
    a = jnp.asarray(random_bits(_rng("j2t", dtype, shape), shape, dtype))
    t = to_torch(a)
    assert tuple(t.shape) == a.shape and bi_torch.dtype_name(t.dtype) == dtype and t.device.type == "cpu"
    # An empty array has no bytes to share, and torch reports data_ptr() 0 for every empty tensor.
    assert t.data_ptr() == (a.unsafe_buffer_pointer() if a.size else 0)
    np.testing.assert_array_equal(torch_bits(t).view(f"int{8 * t.element_size()}"), jax_bits(a))


@pytest.mark.parametrize("name", dlpack.DTYPE_NAMES)
def test_every_listed_dtype_round_trips_zero_copy(name):
    dtype = getattr(torch, name)
    nbytes = torch.empty((), dtype=dtype).element_size()
    if name == "bool":
        t = torch.randint(0, 2, (6, 5)).bool()
    else:
        t = torch.randint(0, 256, (6, 5, nbytes), dtype=torch.uint8).view(dtype).squeeze(-1)
    a = to_jax(t)
    assert a.dtype.name == name and a.unsafe_buffer_pointer() == t.data_ptr()
    back = to_torch(a)
    assert back.dtype == dtype and back.data_ptr() == t.data_ptr()
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_64_bit_dtypes_round_trip_with_x64():
    with jax.enable_x64(True):
        for name in dlpack.X64_DTYPE_NAMES:
            t = torch.arange(12).to(getattr(torch, name)).reshape(3, 4)
            a = to_jax(t)
            assert a.dtype.name == name and a.unsafe_buffer_pointer() == t.data_ptr()
            assert to_torch(a).data_ptr() == t.data_ptr()


def test_writes_through_either_view_are_seen_by_the_other():
    t = torch.zeros(64)
    a = to_jax(t)
    t.fill_(2.5)
    np.testing.assert_array_equal(np.asarray(a), np.full(64, 2.5, np.float32))

    b = jnp.arange(64, dtype=jnp.float32) + 1  # an XLA-owned buffer
    u = to_torch(b)
    u.mul_(2)
    np.testing.assert_array_equal(np.asarray(b), 2 * (np.arange(64, dtype=np.float32) + 1))


def test_to_torch_waits_for_the_computation():
    ones = jnp.ones((2048, 2048), jnp.float32)
    t = to_torch(ones @ ones)  # dispatched asynchronously; DLPack export must wait for it
    assert torch.equal(t, torch.full((2048, 2048), 2048.0))


def test_unaligned_cpu_views_are_copied_correctly_or_refused():
    t = torch.arange(80, dtype=torch.float32)
    assert t.data_ptr() % dlpack.JAX_CPU_ALIGNMENT == 0
    aligned = t[16:]  # 64 bytes in
    assert to_jax(aligned, allow_copy=False).unsafe_buffer_pointer() == aligned.data_ptr()
    unaligned = t[1:]  # 4 bytes in: XLA's CPU runtime needs 64-byte alignment, so JAX copies
    a = to_jax(unaligned)
    assert a.unsafe_buffer_pointer() != unaligned.data_ptr()
    np.testing.assert_array_equal(np.asarray(a), unaligned.numpy())
    with pytest.raises(ValueError, match=r"t: its CPU data is not 64-byte aligned.*allow_copy=False"):
        to_jax(unaligned, allow_copy=False)


# ---------------------------------------------------------------- layouts


def test_transposed_tensors_are_imported_zero_copy():
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    for view in (t.permute(2, 1, 0), t.permute(1, 0, 2), t.transpose(1, 2)):
        a = to_jax(view)
        assert a.unsafe_buffer_pointer() == t.data_ptr()
        np.testing.assert_array_equal(np.asarray(a), view.numpy())


@pytest.mark.parametrize("make", [
    lambda t: t[:, ::2],
    lambda t: t[::2],
    lambda t: t[:, 1:3],
    lambda t: t[:1].expand(4, 6),
    lambda t: t.as_strided((3, 3), (1, 1)),
], ids=["column-step", "row-step", "sub-block", "broadcast", "overlapping"])
def test_gapped_broadcast_or_overlapping_layouts_are_refused(make):
    view = make(torch.arange(24, dtype=torch.float32).reshape(4, 6))
    with pytest.raises(ValueError, match=r"t: JAX imports only dense layouts.*t\.contiguous\(\)"):
        to_jax(view)


def test_layout_rule_matches_what_jax_imports():
    """Our check before the conversion accepts exactly the layouts jax.dlpack imports."""
    base = torch.arange(512, dtype=torch.float32)
    for shape, strides in itertools.chain(
            itertools.product(itertools.product((0, 1, 2, 3), repeat=2), itertools.product((0, 1, 2, 3, 4, 6), repeat=2)),
            itertools.product(itertools.product((1, 2, 3), repeat=3), itertools.product((0, 1, 2, 3, 6), repeat=3))):
        view = base.as_strided(shape, strides)
        accepted = dlpack._compact_layout(shape, strides)
        try:
            imported = jax.dlpack.from_dlpack(view)
        except Exception:
            imported = None
        assert accepted == (imported is not None), (shape, strides)
        if imported is not None:
            np.testing.assert_array_equal(np.asarray(imported), view.numpy())


# ---------------------------------------------------------------- errors before any conversion


def test_to_jax_refuses_what_dlpack_or_jax_cannot_carry():
    with pytest.raises(TypeError, match="t: expected a torch.Tensor; got ndarray"):
        to_jax(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"t: requires grad.*t\.detach\(\)"):
        to_jax(torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="t: a tensor on meta; the meta device holds no data"):
        to_jax(torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match=r"t: layout torch.sparse_coo.*to_dense\(\)"):
        to_jax(torch.eye(3).to_sparse())
    with pytest.raises(ValueError, match=r"t: a lazily conjugated.*resolve_conj\(\)"):
        to_jax(torch.ones(3, dtype=torch.complex64).conj())


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", [torch.complex32, torch.int4, torch.uint3, torch.bits16, torch.float4_e2m1fn_x2])
def test_to_jax_refuses_dtypes_jax_lacks(dtype):
    t = torch.zeros(4, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1 else torch.zeros(2, dtype=dtype)
    with pytest.raises(TypeError, match=f"t: dtype {dtype} has no JAX counterpart through DLPack; supported: bool"):
        to_jax(t)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint64, torch.float64, torch.complex128])
def test_to_jax_refuses_64_bit_dtypes_without_x64(dtype):
    # JAX would narrow them to 32 bits (a copy with other values), so they are refused instead.
    assert not jax.config.jax_enable_x64
    with pytest.raises(TypeError, match="enable jax_enable_x64 for 64-bit dtypes"):
        to_jax(torch.zeros(4, dtype=dtype))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="needs a JAX without a GPU backend")
def test_to_jax_refuses_a_cuda_tensor_when_jax_has_no_gpu():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # a tensor that claims to be on CUDA, on a machine without one
        t = torch.empty(4, device="cuda")
    with pytest.raises(ValueError, match="t: a tensor on cuda:0, but JAX has no cuda backend"):
        to_jax(t)


def test_to_torch_refuses_what_torch_cannot_take():
    with pytest.raises(TypeError, match="a: expected a jax.Array; got Tensor"):
        to_torch(torch.zeros(3))
    with pytest.raises(TypeError, match="a: a traced value"):
        jax.jit(to_torch)(jnp.zeros(3))
    gone = jnp.zeros(3) + 1
    gone.delete()
    with pytest.raises(ValueError, match="a: its buffer was deleted"):
        to_torch(gone)
    for dtype in (jnp.int4, jnp.float8_e3m4, jnp.float4_e2m1fn):
        with pytest.raises(TypeError, match=f"a: dtype {jnp.dtype(dtype).name} has no torch counterpart"):
            to_torch(jnp.zeros(4, dtype))


def test_to_torch_refuses_an_array_spread_over_devices():
    devices = jax.devices("cpu")
    if len(devices) < 2:
        pytest.skip("needs several host devices (conftest sets XLA_FLAGS before jax starts)")
    mesh = jax.sharding.Mesh(np.array(devices[:2]), ("rows",))
    a = jax.device_put(jnp.zeros((4, 3)), NamedSharding(mesh, PartitionSpec("rows")))
    with pytest.raises(ValueError, match=r"a: spread over 2 devices.*addressable_shards"):
        to_torch(a)
    shard = a.addressable_shards[1].data
    assert to_torch(shard).data_ptr() == shard.unsafe_buffer_pointer()


# ---------------------------------------------------------------- the GPU memory policy


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != dlpack.PREALLOCATE_VAR}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environ, capture_output=True, text=True,
                          check=True)


def test_importing_bridge_dlpack_turns_preallocation_off_without_importing_frameworks():
    done = _python("import os, sys, bridge.dlpack\n"
                   "print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'], 'jax' in sys.modules, 'torch' in sys.modules)")
    assert done.stdout.split() == ["false", "False", "False"]


def test_a_preallocation_setting_of_the_users_stands():
    done = _python("import os, bridge.dlpack; print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'])",
                   XLA_PYTHON_CLIENT_PREALLOCATE="true")
    assert done.stdout.split() == ["true"] and not done.stderr


def test_jax_cpu_backend_is_not_mistaken_for_a_gpu_one():
    done = _python("import jax; jax.devices(); import bridge.dlpack as d; print(d._jax_gpu_backend_initialised())",
                   JAX_PLATFORMS="cpu")
    assert done.stdout.split() == ["False"] and "RuntimeWarning" not in done.stderr


def test_policy_warns_when_jax_gpu_backend_started_first(monkeypatch):
    monkeypatch.delenv(dlpack.PREALLOCATE_VAR, raising=False)
    monkeypatch.setattr(dlpack, "_jax_gpu_backend_initialised", lambda: True)
    with pytest.warns(RuntimeWarning, match="already reserved 75% of GPU memory.*XLA_PYTHON_CLIENT_PREALLOCATE=false"):
        dlpack.share_gpu_with_torch()
    assert os.environ[dlpack.PREALLOCATE_VAR] == "false"


def test_policy_is_silent_before_jax_starts_a_gpu(monkeypatch):
    monkeypatch.delenv(dlpack.PREALLOCATE_VAR, raising=False)
    monkeypatch.setattr(dlpack, "_jax_gpu_backend_initialised", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dlpack.share_gpu_with_torch()
    assert os.environ[dlpack.PREALLOCATE_VAR] == "false"


# ---------------------------------------------------------------- kernels across frameworks


def _inputs(dtype: str, residual: str, shape=(2, 3, 100)):
    rng = _rng("xf", dtype, residual, shape)
    scale = np.exp2(rng.uniform(-4, 4, shape[:-1] + (1,)))
    x = (rng.standard_normal(shape) * scale).astype(np.float32).astype(NUMPY[dtype])
    w = rng.standard_normal(shape[-1]).astype(np.float32).astype(NUMPY[dtype])
    r = None if residual == "none" else rng.standard_normal(shape).astype(np.float32).astype(
        NUMPY[dtype] if residual == "same" else np.float32)
    return x, w, r


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
    assert crossframework.best_device() == "cpu"


def test_cross_check_agrees_on_golden_cases(corpus):
    assert crossframework.probe() is None
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
    bits = random_bits(_rng("fbd"), (4, 8), "bfloat16")
    flipped = bits.copy()
    flipped.view(np.uint16)[2, 5] ^= 0x8000  # the sign bit: a different pattern whatever the value
    a, b = jnp.asarray(bits), jnp.asarray(flipped)
    assert crossframework.first_bit_difference(a, jnp.array(a, copy=True)) is None
    problem = crossframework.first_bit_difference(a, b, labels=("torch", "jax"))
    old, new = bits.view(np.uint16)[2, 5], flipped.view(np.uint16)[2, 5]
    assert problem == (f"1 of 32 elements differ; first at index (2, 5): torch {a[2, 5].item()!r} (0x{old:04x}), "
                       f"jax {b[2, 5].item()!r} (0x{new:04x})")
    # Bits, not values: NaN equals the same NaN, and +0 differs from -0.
    nan = jnp.asarray(np.array([np.nan, 0.0], np.float32))
    assert crossframework.first_bit_difference(nan, nan) is None
    assert crossframework.first_bit_difference(nan, nan.at[1].set(-0.0)) == (
        "1 of 2 elements differ; first at index (1,): a 0.0 (0x00000000), b -0.0 (0x80000000)")
    assert crossframework.first_bit_difference(a, a[:2]) == "a is bfloat16[4, 8], b is bfloat16[2, 8]"


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
    got = crossframework._bi_torch_backward(*(None if a is None else torch_from_numpy(a) for a in (x, w, g)), 1e-6,
                                            None if r is None else torch_from_numpy(r),
                                            None if gr is None else torch_from_numpy(gr), mode, offset)
    for e, t in zip(expected, got):
        assert_bitwise_equal(e, numpy_of_torch(t).reshape(e.shape))


def test_cross_check_backward_on_golden_cases(backward_corpus):
    """Short-row cases without subnormals (XLA:CPU flushes them in interpret mode,
    bridge/subnormals.py): every residual kind, with and without grad_new_residual."""
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
    honest = crossframework._bi_jax_backward

    def perturbed(*args):
        grad_x, grad_residual, grad_weight = honest(*args)
        return grad_x, grad_residual, grad_weight.at[7].set(-grad_weight[7])

    monkeypatch.setattr(crossframework, "_bi_jax_backward", perturbed)
    problem = crossframework.cross_check_backward(x, w, g, 1e-6, r, None, "llama", 0.0, device="cpu")
    assert problem is not None and problem.startswith("grad_weight: 1 of 100 elements differ; first at index (7,): ")

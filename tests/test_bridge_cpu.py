"""bridge.interop.dlpack on the CPU: zero-copy by buffer address, bits kept, errors before any conversion,
and the GPU memory policy. Both kernels across frameworks (bridge.interop.crossframework): test_crossframework_cpu.py.

Every numeric assertion is bitwise (integer views).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings

import jax
import jax.dlpack
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

import bi_torch
from bridge import dlpack
from bridge.interop.dlpack import to_jax, to_torch
from bridge_helpers import jax_on_the_cpu  # noqa: F401 (an autouse fixture: JAX on the CPU)
from bridge_helpers import random_bits, torch_bits, torch_from_numpy
from torch_helpers import seeded_rng

DTYPES = ("float32", "bfloat16", "float16")
SHAPES = [(), (0,), (0, 4), (7,), (3, 5), (2, 3, 64)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jax_bits(a: jax.Array) -> np.ndarray:
    return np.asarray(a).view(f"int{8 * a.dtype.itemsize}")


# ---------------------------------------------------------------- zero copy, bits, sharing


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_to_jax_is_zero_copy_and_keeps_bits(dtype, shape):
    t = torch_from_numpy(random_bits(seeded_rng("t2j", dtype, shape), shape, dtype))
    a = to_jax(t)
    assert a.shape == tuple(t.shape) and a.dtype.name == dtype
    assert a.devices() == {jax.devices("cpu")[0]}
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(jax_bits(a), torch_bits(t).view(f"int{8 * t.element_size()}"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_jax_to_torch_is_zero_copy_and_keeps_bits(dtype, shape):
    a = jnp.asarray(random_bits(seeded_rng("j2t", dtype, shape), shape, dtype))
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
    done = _python("import os, sys\nfrom bridge import dlpack\n"
                   "print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'], 'jax' in sys.modules, 'torch' in sys.modules)")
    assert done.stdout.split() == ["false", "False", "False"]


def test_a_preallocation_setting_of_the_users_stands():
    done = _python("import os; from bridge import dlpack; print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'])",
                   XLA_PYTHON_CLIENT_PREALLOCATE="true")
    assert done.stdout.split() == ["true"] and not done.stderr


def test_jax_cpu_backend_is_not_mistaken_for_a_gpu_one():
    done = _python("import jax; jax.devices(); from bridge import dlpack; print(dlpack._jax_gpu_backend_initialised())",
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


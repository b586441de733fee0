"""bridge.interop.dlpack and bridge.interop.crossframework on a CUDA GPU (skipped, with the reason, without one):
stream ordering in both directions, zero-copy by device address, the GPU memory policy, and both
kernels across frameworks bitwise equal to bridge.reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bridge_helpers import NUMPY, cross_inputs
from jax import lax

import bi_jax
import bi_torch
from bridge import dlpack, reference
from bridge.interop import crossframework
from bridge.interop import device as crossframework_device
from bridge.interop.dlpack import to_jax, to_torch
from bridge.verify.compare import assert_bitwise_equal

pytestmark = pytest.mark.gpu

TD = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# About 0.1 s of GPU time at H100 clocks: far longer than JAX needs to read the buffer.
SLEEP_CYCLES = 200_000_000
N = 1 << 24


def _seed(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _torch_bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


def _numpy_of_torch(t: torch.Tensor) -> np.ndarray:
    return _torch_bits(t).view(NUMPY[bi_torch.dtype_name(t.dtype)])


def _cuda_from_numpy(a: np.ndarray) -> torch.Tensor:
    ints = reference.bits(a).view({2: np.int16, 4: np.int32}[a.dtype.itemsize])
    return torch.tensor(ints, device="cuda").view(TD[reference.dtype_name(a.dtype)])


def _gpu() -> jax.Device:
    return jax.devices("gpu")[0]


_count_wrong = jax.jit(lambda a, value: jnp.sum(a != value))


class _UnsynchronisedExport:
    """A tensor whose DLPack export ignores the consumer's stream (stream=-1: no wait)."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()

    def __dlpack__(self, stream=None, **kwargs):
        return self.t.__dlpack__(stream=-1, **kwargs)


def _write_late_on_side_stream(s: torch.cuda.Stream, value: float) -> torch.Tensor:
    """On stream s (made current by the caller): zeros, a long sleep, then the fill with value."""
    t = torch.zeros(N, device="cuda")
    torch.cuda._sleep(SLEEP_CYCLES)
    t.fill_(value)
    return t


# ---------------------------------------------------------------- stream ordering


def test_to_jax_sees_the_producer_streams_finished_writes():
    _count_wrong(jnp.zeros(N, device=_gpu()), 1.0).block_until_ready()  # compile before racing
    s = torch.cuda.Stream()
    for attempt in range(1, 4):
        with torch.cuda.stream(s):
            t = _write_late_on_side_stream(s, float(attempt))
            a = to_jax(t)  # inside the producer's stream context, as DLPack requires
            wrong = int(_count_wrong(a, float(attempt)))  # JAX reads at once, on its own stream
        assert wrong == 0, f"attempt {attempt}: JAX read {wrong} stale elements"
        s.synchronize()


def test_stream_ordering_control_an_unsynchronised_read_is_stale():
    """Without the DLPack stream hand-shake the same read sees the zeros: the test above can fail."""
    _count_wrong(jnp.zeros(N, device=_gpu()), 1.0).block_until_ready()
    s = torch.cuda.Stream()
    stale = []
    for attempt in range(1, 4):
        with torch.cuda.stream(s):
            t = _write_late_on_side_stream(s, float(attempt))
            a = jax.dlpack.from_dlpack(_UnsynchronisedExport(t))
            stale.append(int(_count_wrong(a, float(attempt))))
        s.synchronize()
    assert max(stale) > 0, f"stale counts {stale}: the race did not show, so ordering is untested"


def test_to_torch_waits_for_jax_on_torchs_current_stream():
    n = 4096
    eye = jnp.eye(n, dtype=jnp.float32, device=_gpu())

    @jax.jit
    def slow_fill(m, value):
        # ~50 matrix products, then a fill whose value is known: value + 0 * 1.
        acc = lax.fori_loop(0, 50, lambda i, acc: acc @ m, m)
        return jnp.full((n, n), value, jnp.float32) + 0 * acc[0, 0]

    slow_fill(eye, 0.0).block_until_ready()
    s = torch.cuda.Stream()
    for value in (1.0, 2.0, 3.0):
        a = slow_fill(eye, value)  # queued, not finished
        with torch.cuda.stream(s):
            t = to_torch(a)
            wrong = int((t != value).sum())  # torch reads on s, which must wait for JAX
        assert wrong == 0, f"torch read {wrong} unfinished elements"


# ---------------------------------------------------------------- zero copy on the GPU


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 3, 4096)], ids=str)
def test_zero_copy_both_ways_on_the_gpu(dtype, shape):
    g = torch.Generator(device="cuda").manual_seed(_seed(dtype, shape))
    width = TD[dtype].itemsize
    t = torch.randint(-2 ** (8 * width - 1), 2 ** (8 * width - 1), shape, generator=g, device="cuda",
                      dtype={2: torch.int16, 4: torch.int32}[width]).view(TD[dtype])
    a = to_jax(t)
    assert a.devices() == {_gpu()} and a.dtype.name == dtype and a.shape == tuple(t.shape)
    if t.numel():  # an empty tensor has no bytes to share (torch reports data_ptr() 0)
        assert a.unsafe_buffer_pointer() == t.data_ptr()
    back = to_torch(a)
    assert back.device == t.device and back.data_ptr() == t.data_ptr()
    assert torch.equal(back.view(torch.int16 if width == 2 else torch.int32),
                       t.view(torch.int16 if width == 2 else torch.int32))

    b = lax.bitcast_convert_type(jax.random.bits(jax.random.key(_seed("j", dtype, shape)), shape,
                                                 jnp.uint16 if width == 2 else jnp.uint32), jnp.dtype(dtype))
    u = to_torch(b)
    assert u.device.type == "cuda" and (not u.numel() or u.data_ptr() == b.unsafe_buffer_pointer())
    np.testing.assert_array_equal(_torch_bits(u).view(f"uint{8 * width}"), np.asarray(b).view(f"uint{8 * width}"))


def test_offset_and_transposed_cuda_views_are_zero_copy():
    t = torch.arange(4 * 6, dtype=torch.float32, device="cuda").reshape(4, 6)
    for view in (t.view(-1)[1:], t[1:], t.T, t[1:].T):
        a = to_jax(view, allow_copy=False)
        assert a.unsafe_buffer_pointer() == view.data_ptr()
        np.testing.assert_array_equal(np.asarray(a), view.cpu().numpy())


@pytest.mark.parametrize("name", dlpack.DTYPE_NAMES)
def test_every_listed_dtype_round_trips_zero_copy_on_the_gpu(name):
    dtype = getattr(torch, name)
    if name == "bool":
        t = torch.randint(0, 2, (6, 5), device="cuda").bool()
    else:
        t = torch.randint(0, 256, (6, 5, dtype.itemsize), dtype=torch.uint8, device="cuda").view(dtype).squeeze(-1)
    a = to_jax(t)
    assert a.dtype.name == name and a.unsafe_buffer_pointer() == t.data_ptr()
    back = to_torch(a)
    assert back.dtype == dtype and back.data_ptr() == t.data_ptr()
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_a_pinned_cpu_tensor_is_refused():
    with pytest.raises(ValueError, match="t: a pinned CPU tensor"):
        to_jax(torch.zeros(4).pin_memory())


# ---------------------------------------------------------------- the GPU memory policy


def _python(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != dlpack.PREALLOCATE_VAR}
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environ, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


_FREE_AFTER_JAX = ("import jax, jax.numpy as jnp, torch; jnp.ones(1).block_until_ready(); "
                   "free, total = torch.cuda.mem_get_info(); print(free / total)")


def test_importing_bridge_dlpack_first_keeps_jax_from_preallocating():
    assert float(_python("from bridge import dlpack; " + _FREE_AFTER_JAX)) > 0.5
    # The control: the same measurement sees JAX's default preallocation of 75%.
    assert float(_python(_FREE_AFTER_JAX)) < 0.5


def test_importing_bridge_dlpack_after_jax_took_the_gpu_warns():
    out = _python("import warnings, jax; jax.devices()\n"
                  "with warnings.catch_warnings(record=True) as caught:\n"
                  "    warnings.simplefilter('always')\n"
                  "    from bridge import dlpack\n"
                  "print([str(w.message) for w in caught if w.category is RuntimeWarning])")
    assert "already reserved 75% of GPU memory" in out


# ---------------------------------------------------------------- kernels across frameworks


def _inputs(dtype: str, residual: str, shape=(4, 33, 4096)):
    return cross_inputs(np.random.default_rng(_seed("xf", dtype, residual)), dtype, residual, shape)


CASES = [("bfloat16", "none", "llama", 0.0), ("bfloat16", "same", "fp32", 1.0), ("bfloat16", "float32", "llama", 1.0),
         ("float32", "none", "fp32", 0.0), ("float32", "float32", "llama", 0.0)]


@pytest.mark.parametrize("dtype,residual,mode,offset", CASES)
def test_kernels_across_frameworks_on_cuda_equal_the_reference(dtype, residual, mode, offset):
    x, w, r = _inputs(dtype, residual)
    expected = reference.rms_norm(x, w, 1e-6, r, mode=mode, weight_offset=offset)
    gpu = _gpu()
    xj, wj = jax.device_put(x, gpu), jax.device_put(w, gpu)
    rj = None if r is None else jax.device_put(r, gpu)
    on_jax = crossframework.torch_rms_norm_on_jax(xj, wj, 1e-6, rj, mode=mode, weight_offset=offset)
    jax_own = bi_jax.rms_norm(xj, wj, 1e-6, rj, mode=mode, weight_offset=offset)
    xt, wt = _cuda_from_numpy(x), _cuda_from_numpy(w)
    rt = None if r is None else _cuda_from_numpy(r)
    on_torch = crossframework.jax_rms_norm_on_torch(xt, wt, 1e-6, rt, mode=mode, weight_offset=offset)
    torch_own = bi_torch.rms_norm(xt, wt, 1e-6, rt, mode=mode, weight_offset=offset)
    if r is None:
        expected, on_jax, jax_own, on_torch, torch_own = ((v,) for v in (expected, on_jax, jax_own, on_torch, torch_own))
    for what, e, oj, jo, ot, to in zip(("out", "new_residual"), expected, on_jax, jax_own, on_torch, torch_own):
        assert oj.devices() == {gpu} and ot.device.type == "cuda"
        assert_bitwise_equal(e, np.asarray(oj), f"bi_torch on JAX arrays, {what}")
        assert_bitwise_equal(e, _numpy_of_torch(ot), f"bi_jax on torch tensors, {what}")
        assert_bitwise_equal(np.asarray(jo), np.asarray(oj), f"vs bi_jax's own call, {what}")
        assert_bitwise_equal(_numpy_of_torch(to), _numpy_of_torch(ot), f"vs bi_torch's own call, {what}")


def test_cpu_tensors_stay_on_the_cpu_on_a_gpu_machine():
    x, w, r = _inputs("bfloat16", "float32", shape=(3, 100))
    xt, wt, rt = (torch.tensor(reference.bits(a).view(np.int16 if a.dtype.itemsize == 2 else np.int32)).view(
        TD[reference.dtype_name(a.dtype)]) for a in (x, w, r))
    out, new_residual = crossframework.jax_rms_norm_on_torch(xt, wt, 1e-6, rt)
    assert out.device.type == "cpu" and new_residual.device.type == "cpu"
    expected = reference.rms_norm(x, w, 1e-6, r)
    assert_bitwise_equal(expected[0], _numpy_of_torch(out), "out")
    assert_bitwise_equal(expected[1], _numpy_of_torch(new_residual), "new_residual")


def test_cross_check_on_cuda_agrees_on_golden_cases(corpus):
    assert crossframework_device.best_device() == "cuda"
    # n = 100: every residual kind and all special-value rows; longer rows are covered above.
    cases = [c for c in corpus if c.spec.n == 100 and c.spec.dtype in ("bfloat16", "float32")]
    assert len(cases) == 5
    for case in cases:
        for mode, offset in case.out:
            problem = crossframework.cross_check(case.x, case.weight, case.spec.eps, case.residual, mode, offset)
            assert problem is None, f"{case.spec.name} {mode}/{offset:g}: {problem}"

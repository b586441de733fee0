"""bi_jax on a GPU: the compiled Pallas-Triton kernel (pallas_backend="triton"), bit for bit.

The Mosaic GPU forward, which bi_jax picks by default on compute capability 9.0 and later, has its
own file (tests/test_jax_mosaic_gpu.py); here the default selection runs only where a test says so
(the eager default call of each corpus case, the sharded check).

Skipped, with the reason, without a CUDA GPU (tests/conftest.py, through torch) or when JAX's
default backend is not a GPU. Every numeric assertion is bitwise: against the golden corpus and
bridge.reference, and between calls that must agree (batch sizes 1..4096, compiled vs interpret
mode, donated vs not, sharded vs one device).
"""

from __future__ import annotations

import functools
import os
import re
import zlib

# torch and JAX may share the GPU in one pytest process; effective only if no test initialised
# JAX's GPU client before this module (scripts/gpu_suite.sh sets it for the whole run).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import bi_jax  # noqa: E402
from bi_jax.mosaic_kernel import MAX_N  # noqa: E402
from bridge import golden, reference  # noqa: E402
from bridge.bench.timing import array_copies  # noqa: E402
from bridge.verify.compare import assert_bitwise_equal  # noqa: E402

from jax_gpu_marks import JAX_GPU_MARKS  # noqa: E402
from jax_helpers import ref  # noqa: E402

pytestmark = JAX_GPU_MARKS

CASE_NAMES = [entry["name"] for entry in golden.load_manifest()["cases"]]
JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NUMPY_DTYPES = {name: reference.numpy_dtype(name) for name in ("float32", "bfloat16", "float16")}
STATIC = ("eps", "mode", "weight_offset")
# The compiled Pallas-Triton kernel (interpret=False, explicitly) and interpret mode, each jitted once per shape.
COMPILED = jax.jit(functools.partial(bi_jax.rms_norm, interpret=False, pallas_backend="triton"),
                   static_argnames=STATIC)
INTERPRETED = jax.jit(functools.partial(bi_jax.rms_norm, interpret=True), static_argnames=STATIC)

ROWS = 4096
SIZES = tuple(range(1, 65)) + (127, 128, 129, 255, 256, 1000, 1023, 1024, 4095, 4096)
SIZES_LONG = (1, 2, 3, 5, 8, 16, 17, 64, 129, 1000, 4095, 4096)  # n = 65536: 1 GiB per float32 array


def _seed(*parts) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def _bits(a: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(a, {2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(a.dtype).itemsize])


def _same(a: jax.Array, b: jax.Array) -> jax.Array:
    """On the device: True when a and b have the same shape, dtype and bits."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return jnp.bool_(False)
    return jnp.all(_bits(a) == _bits(b))


def assert_bits(expected, actual, what: str = "") -> None:
    assert_bitwise_equal(np.asarray(expected), np.asarray(actual), what)


def pair(result, has_residual: bool):
    return tuple(result) if has_residual else (result, None)


def gpu_rows(key: jax.Array, shape, dtype: str) -> jax.Array:
    """Normal values with a per-row scale in [2**-4, 2**4], made on the GPU."""
    k1, k2 = jax.random.split(key)
    scale = jnp.exp2(jax.random.uniform(k1, tuple(shape[:-1]) + (1,), minval=-4.0, maxval=4.0))
    return (jax.random.normal(k2, tuple(shape), jnp.float32) * scale).astype(JNP_DTYPES[dtype])


def gpu_weight(key: jax.Array, n: int, dtype: str) -> jax.Array:
    return (1.0 + 0.25 * jax.random.normal(key, (n,), jnp.float32)).astype(JNP_DTYPES[dtype])


def test_jax_sees_a_gpu():
    assert jax.default_backend() == "gpu"
    assert bi_jax.ops.default_interpret() is False


# --------------------------------------------------------------------------------------------
# The golden corpus through the compiled kernel.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_case_compiled(cases_by_name, name):
    case = cases_by_name[name]
    x, w = jnp.asarray(case.x), jnp.asarray(case.weight)
    r = None if case.residual is None else jnp.asarray(case.residual)
    for (mode, offset), expected in case.out.items():
        out, new_res = pair(COMPILED(x, w, case.spec.eps, r, mode=mode, weight_offset=offset), r is not None)
        what = f"{name} ({mode}, offset {offset})"
        assert_bits(expected, out, f"{what} out")
        if r is not None:
            assert_bits(case.new_residual, new_res, f"{what} new_residual")
    # The default (interpret=None, the default selection) picks a compiled kernel on a GPU: same bits, eagerly too.
    mode, offset = next(iter(case.out))
    default = pair(bi_jax.rms_norm(x, w, case.spec.eps, r, mode=mode, weight_offset=offset), r is not None)
    assert_bits(case.out[(mode, offset)], default[0], f"{name} default interpret=None")


# --------------------------------------------------------------------------------------------
# Batch invariance: every row of x[:B] and x[-B:] equals the same row of one 4096-row call.
# --------------------------------------------------------------------------------------------

INVARIANCE = [(n, dtype, kind) for n in (128, 4096, 5120, 8192, 16384, 65536)
              for dtype in ("bfloat16", "float32") for kind in ("none", "float32")]


@pytest.mark.parametrize("n,dtype,kind", INVARIANCE, ids=[f"n{n}-{d}-res_{k}" for n, d, k in INVARIANCE])
def test_batch_invariance_1_to_4096(n, dtype, kind):
    eps, mode, offset, has_r = 1e-6, "llama", 0.0, kind != "none"
    keys = jax.random.split(jax.random.key(_seed("gpu-invariance", n, dtype, kind)), 3)
    x = gpu_rows(keys[0], (ROWS, n), dtype)
    w = gpu_weight(keys[1], n, dtype)
    r = gpu_rows(keys[2], (ROWS, n), "float32") if has_r else None
    full = pair(COMPILED(x, w, eps, r, mode=mode, weight_offset=offset), has_r)

    # A few rows of the full call against the reference (the sweep below then compares GPU to GPU).
    pick = np.array([0, 1, ROWS // 2, ROWS - 1])
    xs, rs = np.asarray(x[pick]), None if r is None else np.asarray(r[pick])
    e_out, e_res = ref(xs, np.asarray(w), eps, rs, mode, offset)
    assert_bits(e_out, full[0][pick], "4096-row call vs reference")
    if has_r:
        assert_bits(e_res, full[1][pick], "4096-row call new_residual vs reference")

    for batch in SIZES_LONG if n >= 65536 else SIZES:
        @jax.jit
        def check(x, w, r, full_out, full_res, batch=batch):
            ok = []
            for part in (slice(None, batch), slice(ROWS - batch, None)):
                got = pair(bi_jax.rms_norm(x[part], w, eps, None if r is None else r[part], mode=mode,
                                           weight_offset=offset, interpret=False, pallas_backend="triton"), has_r)
                ok.append(_same(got[0], full_out[part]))
                if has_r:
                    ok.append(_same(got[1], full_res[part]))
            return jnp.stack(ok)

        ok = np.asarray(check(x, w, r, full[0], full[1]))
        if not ok.all():  # the first differing element, for the message
            for part in (slice(None, batch), slice(ROWS - batch, None)):
                got = pair(COMPILED(x[part], w, eps, None if r is None else r[part], mode=mode,
                                    weight_offset=offset), has_r)
                assert_bits(full[0][part], got[0], f"B={batch} rows {part}: out")
                if has_r:
                    assert_bits(full[1][part], got[1], f"B={batch} rows {part}: new_residual")
            raise AssertionError(f"B={batch}: on-device comparison failed but host comparison passed: {ok}")


# --------------------------------------------------------------------------------------------
# Compiled (GPU) vs interpret mode (on the CPU device, as `bi-norm verify` runs it).
# --------------------------------------------------------------------------------------------

AGREE = [("bfloat16", "float32", "llama", 0.0, 4096), ("float16", "same", "fp32", 1.0, 1000),
         ("float32", "none", "fp32", 0.0, 5120), ("bfloat16", "same", "llama", 1.0, 20000)]


@pytest.mark.parametrize("dtype,kind,mode,offset,n", AGREE)
def test_compiled_matches_interpret(dtype, kind, mode, offset, n):
    rng = np.random.default_rng(_seed("agree", dtype, kind, mode, offset, n))
    np_dtype = NUMPY_DTYPES[dtype]
    x = (rng.standard_normal((37, n)) * np.exp2(rng.uniform(-8, 8, (37, 1)))).astype(np.float32).astype(np_dtype)
    w = (1 + 0.25 * rng.standard_normal(n)).astype(np.float32).astype(np_dtype)
    r = None
    if kind != "none":
        r = rng.standard_normal((37, n)).astype(np.float32).astype(np_dtype if kind == "same" else np.float32)
    gx, gw, gr = (None if a is None else jax.device_put(a, jax.devices()[0]) for a in (x, w, r))
    cx, cw, cr = (None if a is None else jax.device_put(a, jax.devices("cpu")[0]) for a in (x, w, r))
    compiled = pair(COMPILED(gx, gw, 1e-6, gr, mode=mode, weight_offset=offset), r is not None)
    interpreted = pair(INTERPRETED(cx, cw, 1e-6, cr, mode=mode, weight_offset=offset), r is not None)
    assert list(interpreted[0].devices())[0].platform == "cpu"
    assert_bits(interpreted[0], compiled[0], "compiled vs interpret: out")
    assert_bits(ref(x, w, 1e-6, r, mode, offset)[0], compiled[0], "compiled vs reference: out")
    if r is not None:
        assert_bits(interpreted[1], compiled[1], "compiled vs interpret: new_residual")


# --------------------------------------------------------------------------------------------
# Donating x and the residual: out is written in x's buffer and the new residual in the residual's,
# without a copy (jax.jit pairs x with `out` and the residual with the new residual), from
# either kernel body (the Mosaic GPU one aliases through bi_jax.mosaic_call).
# --------------------------------------------------------------------------------------------


DONATE = [("bfloat16", "float32", 4096), ("bfloat16", "float32", 65536), ("bfloat16", "bfloat16", 4096),
          ("float32", "float32", 4096)]


@pytest.mark.parametrize("dtype,rdtype,n,backend", [c + (b,) for c in DONATE for b in ("triton", "mosaic")
                                                     if b == "triton" or c[2] <= MAX_N])  # Mosaic's widest row
def test_donated_residual(dtype, rdtype, n, backend):
    keys = jax.random.split(jax.random.key(_seed("gpu-donate", dtype, rdtype, n)), 3)
    x, w = gpu_rows(keys[0], (64, n), dtype), gpu_weight(keys[1], n, dtype)
    r = gpu_rows(keys[2], (64, n), rdtype)
    fn = lambda a, b, c: bi_jax.rms_norm(a, b, 1e-6, c, pallas_backend=backend)  # noqa: E731
    r_before = np.asarray(r)
    plain = jax.jit(fn)(x, w, r)
    assert_bits(r_before, r, "a residual that was not donated is unchanged")
    donating = jax.jit(fn, donate_argnums=(0, 2))
    given_x, donated = jnp.copy(x), jnp.copy(r)  # fresh buffers with x's and r's bits, to give away
    pointers = [given_x.unsafe_buffer_pointer(), donated.unsafe_buffer_pointer()]
    got = donating(given_x, w, donated)
    assert donated.is_deleted() and given_x.is_deleted()
    assert_bits(plain[0], got[0], "donated vs not: out")
    assert_bits(plain[1], got[1], "donated vs not: new_residual")
    text = donating.lower(x, w, r).compile().as_text()
    aliases = re.search(r"input_output_alias=\{(.*?)\}, entry", text)
    assert [g.unsafe_buffer_pointer() for g in got] == pointers, f"aliases {aliases and aliases.group(1)}"
    assert aliases and re.search(r"\{1\}: \(2, \{\}, (may|must)-alias\)", aliases.group(1)), aliases
    # No copy of x or the residual: the kernel writes both outputs in place.
    copies = array_copies(text)
    assert not copies, copies


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("dtype,rdtype", [("bfloat16", "bfloat16"), ("bfloat16", "float32")])
def test_residual_in_a_layer_loop_is_not_copied(dtype, rdtype, backend):
    """A residual carried through lax.scan over layers is updated in place: no copy in the loop."""
    n, layers = 4096, 3
    keys = jax.random.split(jax.random.key(_seed("gpu-scan", dtype, rdtype)), 3)
    h, r = gpu_rows(keys[0], (64, n), dtype), gpu_rows(keys[1], (64, n), rdtype)
    ws = jnp.stack([gpu_weight(k, n, dtype) for k in jax.random.split(keys[2], layers)])

    def step(carry, w):
        out, new_r = bi_jax.rms_norm(carry[0], w, 1e-6, carry[1], pallas_backend=backend)
        return (out * 2, new_r), None  # `* 2` stands for the layer between two norms

    looped = jax.jit(lambda c, w: lax.scan(step, c, w)[0], donate_argnums=0)
    text = looped.lower((h, r), ws).compile().as_text()
    copies = array_copies(text)
    assert not copies, copies
    expected = (h, r)
    for i in range(layers):
        expected = step(expected, ws[i])[0]
    got = looped((jnp.copy(h), jnp.copy(r)), ws)
    assert_bits(expected[0], got[0], "scan vs unrolled: h")
    assert_bits(expected[1], got[1], "scan vs unrolled: residual")


# --------------------------------------------------------------------------------------------
# Sharded over every visible GPU (skipped with one).
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "float32"])
def test_sharded_over_gpus(kind):
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip(f"needs more than one GPU; {len(devices)} visible")
    mesh = Mesh(np.array(devices), ("b",))
    rows, n, eps, has_r = 16 * len(devices), 4096, 1e-6, kind != "none"
    keys = jax.random.split(jax.random.key(_seed("gpu-sharded", kind)), 3)
    x = gpu_rows(keys[0], (rows, n), "bfloat16")
    w = gpu_weight(keys[1], n, "bfloat16")
    r = gpu_rows(keys[2], (rows, n), "float32") if has_r else None
    row_sharding = NamedSharding(mesh, PartitionSpec("b", None))
    args = [jax.device_put(x, row_sharding), jax.device_put(w, NamedSharding(mesh, PartitionSpec()))]
    if has_r:
        args.append(jax.device_put(r, row_sharding))
    f = jax.jit(lambda a, b, *c: bi_jax.rms_norm(a, b, eps, *c))
    got = pair(f(*args), has_r)
    single = pair(f(*(jax.device_put(a, devices[0]) for a in (x, w) + ((r,) if has_r else ()))), has_r)
    assert_bits(single[0], got[0], "sharded vs one GPU: out")
    if has_r:
        assert_bits(single[1], got[1], "sharded vs one GPU: new_residual")
    for out in got:
        if out is not None:
            assert out.sharding.is_equivalent_to(row_sharding, 2), out.sharding
    hlo = f.lower(*args).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo

"""bi_jax on the CPU: the Pallas kernel in interpret mode (XLA's CPU backend), bit for bit.

Every numeric assertion is bitwise (integer views): against the golden corpus, against
bridge.reference, and between calls that must agree (a row alone vs in a batch, jit vs eager,
vmap vs per slice, sharded vs one device, donated vs not, the flax module vs the function).

Interpret-mode pallas calls cost an XLA compile per distinct shape and static argument, so the
tests reuse a few shapes (mostly n = 100) and run loops through one jitted function.
"""

from __future__ import annotations

import functools
import logging
import re
import subprocess
import sys
import zlib
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import bi_jax
from bridge import golden, reference
from bridge.compare import assert_bitwise_equal

DTYPES = ("float32", "bfloat16", "float16")
NUMPY_DTYPES = {name: reference.numpy_dtype(name) for name in ("float32", "bfloat16", "float16")}
JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CASE_NAMES = [entry["name"] for entry in golden.load_manifest()["cases"]]
N = 100  # the row length most tests share (pads to 128: masked columns, 16 rows per program)

# One jitted entry point shared by the tests, so equal shapes and static arguments compile once.
JIT = jax.jit(bi_jax.rms_norm, static_argnames=("eps", "mode", "weight_offset"))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _seed(*parts) -> int:
    """A deterministic seed from the test's parameters (hash() of str is salted per process)."""
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def random_rows(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    """Normal values with a per-row scale in [2**-4, 2**4], rounded to `dtype`."""
    shape = tuple(shape)
    scale = np.exp2(rng.uniform(-4, 4, shape[:-1] + (1,)))
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(NUMPY_DTYPES[dtype])


def special_rows(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    """random_rows with about 2% zeros, infinities, NaNs, huge and tiny values."""
    v = random_rows(rng, shape, "float32").astype(np.float64)
    flat = v.reshape(-1)
    if flat.size:
        k = max(1, flat.size // 50)
        choices = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e4, -3e4, 1e-6, 6e-8, 2.0**70, 2.0**-70])
        flat[rng.integers(0, flat.size, k)] = rng.choice(choices, k)
    with np.errstate(over="ignore"):
        return v.astype(np.float32).astype(NUMPY_DTYPES[dtype])


def random_weight(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    w = 1.0 + 0.25 * rng.standard_normal(n)
    w[rng.integers(0, n)] = -0.0
    return w.astype(np.float32).astype(NUMPY_DTYPES[dtype])


def residual_dtype(dtype: str, kind: str) -> Optional[str]:
    return None if kind == "none" else (dtype if kind == "same" else "float32")


def ref(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6, residual: Optional[np.ndarray] = None,
        mode: str = "llama", weight_offset: float = 0.0) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """bridge.reference.rms_norm over any leading shape, always as (out, new_residual or None)."""
    n = x.shape[-1]
    r2 = None if residual is None else residual.reshape(-1, n)
    result = reference.rms_norm(x.reshape(-1, n), weight, eps, r2, mode=mode, weight_offset=weight_offset)
    if residual is None:
        return result.reshape(x.shape), None
    return result[0].reshape(x.shape), result[1].reshape(x.shape)


def pair(result, has_residual: bool):
    """bi_jax.rms_norm's result as (out, new_residual or None)."""
    return tuple(result) if has_residual else (result, None)


def assert_bits(expected, actual, what: str = "") -> None:
    """Bitwise equality of numpy or JAX arrays (shape and dtype included); the first difference is named."""
    assert_bitwise_equal(np.asarray(expected), np.asarray(actual), what)


def assert_pair_bits(expected, actual, what: str) -> None:
    assert_bits(expected[0], actual[0], f"{what}: out")
    assert (expected[1] is None) == (actual[1] is None), f"{what}: new_residual presence"
    if expected[1] is not None:
        assert_bits(expected[1], actual[1], f"{what}: new_residual")


# --------------------------------------------------------------------------------------------
# A) The golden corpus, bit for bit, through the public function (interpret=None: interpret on CPU).
# --------------------------------------------------------------------------------------------


def test_interpret_is_the_default_on_cpu():
    assert jax.default_backend() == "cpu"
    assert bi_jax.ops.default_interpret() is True


@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_case(cases_by_name, name):
    case = cases_by_name[name]
    x, w = jnp.asarray(case.x), jnp.asarray(case.weight)
    r = None if case.residual is None else jnp.asarray(case.residual)
    for (mode, offset), expected in case.out.items():
        out, new_res = pair(bi_jax.rms_norm(x, w, case.spec.eps, r, mode=mode, weight_offset=offset), r is not None)
        what = f"{name} ({mode}, offset {offset})"
        assert out.shape == x.shape and out.dtype == x.dtype
        assert_bits(expected, out, f"{what} out")
        if r is None:
            assert new_res is None
        else:
            assert new_res.dtype == r.dtype
            assert_bits(case.new_residual, new_res, f"{what} new_residual")
    # The kernel writes an output into the residual's buffer only when it is donated.
    assert_bits(case.x, x, f"{name}: x was modified")
    if r is not None:
        assert_bits(case.residual, r, f"{name}: residual was modified")


# --------------------------------------------------------------------------------------------
# B) No FMA contraction in interpret mode: short float32 rows whose squares are inexact.
# --------------------------------------------------------------------------------------------


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma(a, b, c): the float64 product of two float32 values is exact, then one rounding."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_fma_contraction_in_interpret_mode(n):
    rows, eps = 200, 1e-6
    rng = np.random.default_rng(_seed("fma", n))
    # Full-mantissa float32 values whose squares are inexact, scaled so that v*v, eps and the
    # other squares are of similar size (every place where mul+add could fuse changes bits).
    scale = np.exp2(rng.uniform(-12, 2, (rows, 1)))
    x = (rng.uniform(0.5, 1.0, (rows, n)) * rng.choice([-1.0, 1.0], (rows, n)) * scale).astype(np.float32)
    r = (rng.uniform(0.5, 1.0, (rows, n)) * scale).astype(np.float32)
    w = random_weight(rng, n, "float32")

    # The data can tell a fused from an unfused computation: q0 + q1 vs fma(v0, v0, q1) (n >= 2),
    # or q0 + eps vs fma(v0, v0, eps) (n == 1), differ for many rows.
    v = x.astype(np.float32)
    q = v * v
    if n == 1:
        plain, fused = q[:, 0] + np.float32(eps), _fma(v[:, 0], v[:, 0], np.full(rows, eps, np.float32))
    else:
        plain, fused = q[:, 0] + q[:, 1], _fma(v[:, 0], v[:, 0], q[:, 1])
    assert np.count_nonzero(plain != fused) > rows // 10

    for res, mode, offset in ((None, "llama", 0.0), (r, "fp32", 1.0)):
        expected = ref(x, w, eps, res, mode, offset)
        got = pair(bi_jax.rms_norm(jnp.asarray(x), jnp.asarray(w), eps, None if res is None else jnp.asarray(res),
                                   mode=mode, weight_offset=offset), res is not None)
        assert_pair_bits(expected, got, f"n={n} residual={res is not None}")


# --------------------------------------------------------------------------------------------
# C) jax.jit equals eager.
# --------------------------------------------------------------------------------------------

JIT_COMBOS = [("float32", "none", "llama", 0.0), ("bfloat16", "float32", "fp32", 1.0),
              ("float16", "same", "llama", 1.0)]


@pytest.mark.parametrize("dtype,kind,mode,offset", JIT_COMBOS)
def test_jit_matches_eager(dtype, kind, mode, offset):
    rng = np.random.default_rng(_seed("jit", dtype, kind, mode, offset))
    x = random_rows(rng, (3, 5, N), dtype)
    w = random_weight(rng, N, dtype)
    r = None if kind == "none" else random_rows(rng, (3, 5, N), residual_dtype(dtype, kind))
    eps = 1e-5
    jr = None if r is None else jnp.asarray(r)
    eager = pair(bi_jax.rms_norm(jnp.asarray(x), jnp.asarray(w), eps, jr, mode=mode, weight_offset=offset),
                 r is not None)
    jitted = pair(JIT(jnp.asarray(x), jnp.asarray(w), eps, jr, mode=mode, weight_offset=offset), r is not None)
    assert_pair_bits(eager, jitted, "jit vs eager")
    assert_pair_bits(ref(x, w, eps, r, mode, offset), jitted, "jit vs reference")
    # interpret=True is what interpret=None picked.
    interpreted = jax.jit(functools.partial(bi_jax.rms_norm, interpret=True),
                          static_argnames=("eps", "mode", "weight_offset"))
    explicit = pair(interpreted(jnp.asarray(x), jnp.asarray(w), eps, jr, mode=mode, weight_offset=offset),
                    r is not None)
    assert_pair_bits(jitted, explicit, "interpret=True vs default")


# --------------------------------------------------------------------------------------------
# D) jax.vmap: a batched call equals the unbatched call on each slice.
# --------------------------------------------------------------------------------------------


def _vmap_inputs(kind: str, dtype: str = "bfloat16"):
    rng = np.random.default_rng(_seed("vmap", kind, dtype))
    x = random_rows(rng, (3, 4, N), dtype)
    r = None if kind == "none" else random_rows(rng, (3, 4, N), residual_dtype(dtype, kind))
    ws = np.stack([random_weight(rng, N, dtype) for _ in range(3)])
    return x, r, ws


@pytest.mark.parametrize("kind", ["none", "float32", "same"])
@pytest.mark.parametrize("axis", [0, 1])
def test_vmap_over_an_axis(axis, kind):
    x, r, ws = _vmap_inputs(kind)
    w, eps, has_r = ws[0], 1e-6, r is not None
    jw = jnp.asarray(w)
    if has_r:
        f = jax.vmap(lambda a, b: bi_jax.rms_norm(a, jw, eps, b), in_axes=(axis, axis), out_axes=axis)
        batched = pair(f(jnp.asarray(x), jnp.asarray(r)), True)
    else:
        f = jax.vmap(lambda a: bi_jax.rms_norm(a, jw, eps), in_axes=axis, out_axes=axis)
        batched = pair(f(jnp.asarray(x)), False)
    assert batched[0].shape == x.shape
    assert_pair_bits(ref(x, w, eps, r), batched, f"vmap axis {axis} vs reference")
    for i in range(x.shape[axis]):
        xi = np.take(x, i, axis=axis)
        ri = None if r is None else jnp.asarray(np.take(r, i, axis=axis))
        single = pair(JIT(jnp.asarray(xi), jw, eps, ri), has_r)
        sliced = tuple(None if b is None else np.take(np.asarray(b), i, axis=axis) for b in batched)
        assert_pair_bits(single, sliced, f"vmap axis {axis}, slice {i} vs unbatched")


@pytest.mark.parametrize("kind", ["none", "float32"])
def test_vmap_with_a_batched_weight(kind):
    x, r, ws = _vmap_inputs(kind)
    eps, mode, offset, has_r = 1e-5, "fp32", 1.0, r is not None
    fn = functools.partial(bi_jax.rms_norm, eps=eps, mode=mode, weight_offset=offset)
    if has_r:
        batched = pair(jax.vmap(lambda a, w, b: fn(a, w, residual=b), in_axes=(0, 0, 0))(
            jnp.asarray(x), jnp.asarray(ws), jnp.asarray(r)), True)
    else:
        batched = pair(jax.vmap(fn, in_axes=(0, 0))(jnp.asarray(x), jnp.asarray(ws)), False)
    for i in range(3):
        ri = None if r is None else r[i]
        single = pair(JIT(jnp.asarray(x[i]), jnp.asarray(ws[i]), eps, None if ri is None else jnp.asarray(ri),
                          mode=mode, weight_offset=offset), has_r)
        sliced = tuple(None if b is None else b[i] for b in batched)
        assert_pair_bits(single, sliced, f"batched weight, slice {i} vs unbatched")
        assert_pair_bits(ref(x[i], ws[i], eps, ri, mode, offset), sliced, f"batched weight, slice {i} vs reference")


def test_vmap_with_only_the_weight_batched():
    x, _, ws = _vmap_inputs("none")
    eps = 1e-6
    batched = jax.vmap(lambda w: bi_jax.rms_norm(jnp.asarray(x[0]), w, eps))(jnp.asarray(ws))
    assert batched.shape == (3, 4, N)
    for i in range(3):
        assert_bits(JIT(jnp.asarray(x[0]), jnp.asarray(ws[i]), eps), batched[i], f"weight {i} vs unbatched")
        assert_bits(ref(x[0], ws[i], eps)[0], batched[i], f"weight {i} vs reference")


def test_nested_vmap_under_jit():
    x, r, ws = _vmap_inputs("float32")
    eps, w = 1e-6, jnp.asarray(ws[1])
    f = jax.jit(jax.vmap(jax.vmap(lambda a, b: bi_jax.rms_norm(a, w, eps, b))))
    got = pair(f(jnp.asarray(x), jnp.asarray(r)), True)
    assert_pair_bits(ref(x, ws[1], eps, r), got, "jit(vmap(vmap)) vs reference")


# --------------------------------------------------------------------------------------------
# E) Batch invariance: a row alone vs the same row in batches, anywhere, among random rows.
# --------------------------------------------------------------------------------------------

# n = 16385 takes the chunked path (rows longer than MAX_WHOLE_ROW: one row per program, 2 chunks).
INVARIANCE_COMBOS = [("float32", "none", "llama", 0.0, N), ("bfloat16", "float32", "llama", 0.0, N),
                     ("float16", "same", "fp32", 1.0, N), ("bfloat16", "float32", "fp32", 1.0, 16385)]


@pytest.mark.parametrize("dtype,kind,mode,offset,n", INVARIANCE_COMBOS)
def test_batch_invariance(dtype, kind, mode, offset, n):
    rng = np.random.default_rng(_seed("invariance", dtype, kind, mode, offset, n))
    eps, has_r, rdt = 1e-6, kind != "none", residual_dtype(dtype, kind)
    w = jnp.asarray(random_weight(rng, n, dtype))
    row = random_rows(rng, (n,), dtype)
    res_row = None if not has_r else random_rows(rng, (n,), rdt)

    def call(xs, rs):
        return pair(JIT(jnp.asarray(xs), w, eps, None if rs is None else jnp.asarray(rs), mode=mode,
                        weight_offset=offset), has_r)

    alone = call(row, res_row)  # a 1-D x: one row
    assert_pair_bits(ref(row[None], np.asarray(w), eps, None if res_row is None else res_row[None], mode, offset),
                     tuple(None if a is None else a[None] for a in alone), "alone vs reference")
    for batch in (1, 2, 5, 33):
        for lead in ((batch,), (2, batch)):
            for pos in sorted({0, batch // 2, batch - 1}):
                index = (lead[0] - 1, pos) if len(lead) == 2 else (pos,)
                xs = random_rows(rng, lead + (n,), dtype)
                xs[index] = row
                rs = None
                if has_r:
                    rs = random_rows(rng, lead + (n,), rdt)
                    rs[index] = res_row
                got = call(xs, rs)
                what = f"row at {index} of {lead + (n,)}"
                assert_pair_bits(alone, tuple(None if g is None else g[index] for g in got), what)


# --------------------------------------------------------------------------------------------
# F) A batch sharded over the 4 host devices runs the kernel per shard, without a gather.
# --------------------------------------------------------------------------------------------

COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")


@pytest.fixture(scope="module")
def mesh():
    devices = jax.devices()
    assert len(devices) == 4, "tests/conftest.py sets --xla_force_host_platform_device_count=4"
    return Mesh(np.array(devices), ("b",))


@pytest.mark.parametrize("kind", ["none", "float32"])
def test_sharded_rows(mesh, kind):
    rng = np.random.default_rng(_seed("sharded", kind))
    dtype, eps, has_r = "bfloat16", 1e-6, kind != "none"
    x = random_rows(rng, (8, N), dtype)
    w = random_weight(rng, N, dtype)
    r = random_rows(rng, (8, N), "float32") if has_r else None
    rows = NamedSharding(mesh, PartitionSpec("b", None))
    replicated = NamedSharding(mesh, PartitionSpec())
    args = [jax.device_put(x, rows), jax.device_put(w, replicated)]
    if has_r:
        args.append(jax.device_put(r, rows))
    f = jax.jit(lambda a, b, *c: bi_jax.rms_norm(a, b, eps, *c))
    got = pair(f(*args), has_r)

    single = pair(f(*(jax.device_put(a, jax.devices()[0]) for a in (x, w) + ((r,) if has_r else ()))), has_r)
    assert_pair_bits(single, got, "sharded vs one device")
    assert_pair_bits(ref(x, w, eps, r), got, "sharded vs reference")
    for out in got:
        if out is None:
            continue
        assert out.sharding.is_equivalent_to(rows, out.ndim), out.sharding
        assert {s.data.shape for s in out.addressable_shards} == {(2, N)}
    hlo = f.lower(*args).compile().as_text()
    assert not [c for c in COLLECTIVES if c in hlo], "the kernel must run on each shard's rows"


def test_sharded_leading_axis_of_3d_input(mesh):
    rng = np.random.default_rng(_seed("sharded3d"))
    x, w, eps = random_rows(rng, (4, 3, N), "float32"), random_weight(rng, N, "float32"), 1e-6
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("b", None, None)))
    ws = jax.device_put(w, NamedSharding(mesh, PartitionSpec()))
    f = jax.jit(lambda a, b: bi_jax.rms_norm(a, b, eps))
    got = f(xs, ws)
    assert_bits(ref(x, w, eps)[0], got, "3-D sharded vs reference")
    assert_bits(f(jax.device_put(x, jax.devices()[0]), jax.device_put(w, jax.devices()[0])), got,
                "3-D sharded vs one device")
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("b", None, None)), 3), got.sharding
    hlo = f.lower(xs, ws).compile().as_text()
    assert not [c for c in COLLECTIVES if c in hlo]


def test_sharded_columns_still_give_the_same_bits(mesh):
    # Rows split across columns must be gathered first; whatever XLA does, the bits are the row's.
    rng = np.random.default_rng(_seed("sharded-cols"))
    x, w, eps = random_rows(rng, (6, 128), "bfloat16"), random_weight(rng, 128, "bfloat16"), 1e-6
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "b")))
    ws = jax.device_put(w, NamedSharding(mesh, PartitionSpec("b")))
    got = jax.jit(lambda a, b: bi_jax.rms_norm(a, b, eps))(xs, ws)
    assert_bits(ref(x, w, eps)[0], got, "column-sharded vs reference")


# --------------------------------------------------------------------------------------------
# G) Donating x and the residual: out is written in x's buffer and the new residual in the
#    residual's, with the same bits (jax.jit pairs x with `out`, the residual with the new one).
# --------------------------------------------------------------------------------------------


def _alias_map(compiled_text: str) -> str:
    match = re.search(r"input_output_alias=\{(.*?)\}, entry_computation_layout", compiled_text)
    return match.group(1) if match else ""


DONATE = [("bfloat16", "float32"), ("float16", "float32"), ("float32", "float32"), ("bfloat16", "bfloat16"),
          ("float16", "float16")]


@pytest.mark.parametrize("dtype,rdtype", DONATE)
def test_donated_residual(dtype, rdtype):
    rng = np.random.default_rng(_seed("donate", dtype, rdtype))
    x, w, r = random_rows(rng, (8, N), dtype), random_weight(rng, N, dtype), random_rows(rng, (8, N), rdtype)
    fn = lambda a, b, c: bi_jax.rms_norm(a, b, 1e-6, c)  # noqa: E731
    plain = jax.jit(fn)(jnp.asarray(x), jnp.asarray(w), jnp.asarray(r))
    donating = jax.jit(fn, donate_argnums=(0, 2))
    jx, jw, jr = jnp.asarray(x), jnp.asarray(w), jnp.asarray(r)
    # Entry output 0 (out) may alias parameter 0 (x), output 1 (the new residual) parameter 2.
    aliases = _alias_map(donating.lower(jx, jw, jr).compile().as_text())
    assert re.search(r"\{0\}: \(0, \{\}, (may|must)-alias\)", aliases), aliases
    assert re.search(r"\{1\}: \(2, \{\}, (may|must)-alias\)", aliases), aliases
    pointers = [jx.unsafe_buffer_pointer(), jr.unsafe_buffer_pointer()]
    got = donating(jx, jw, jr)
    assert jx.is_deleted() and jr.is_deleted()
    assert [g.unsafe_buffer_pointer() for g in got] == pointers, f"outputs not in the donated buffers; {aliases}"
    assert_pair_bits(tuple(plain), tuple(got), "donated vs not")
    assert_pair_bits(ref(x, w, 1e-6, r), tuple(got), "donated vs reference")
    # The residual is left alone when it is not donated (jitted or eager).
    kept = jnp.asarray(r)
    jx = jnp.asarray(x)
    jax.block_until_ready(jax.jit(fn)(jx, jw, kept))
    jax.block_until_ready(fn(jx, jw, kept))
    assert not kept.is_deleted()
    assert_bits(r, kept, "a residual that was not donated is unchanged")


# --------------------------------------------------------------------------------------------
# H) Edge shapes: empty batches, n = 1.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, N), (2, 0, N)])
@pytest.mark.parametrize("kind", ["none", "float32"])
def test_empty_batch(shape, kind):
    x = jnp.zeros(shape, jnp.bfloat16)
    w = jnp.ones((N,), jnp.bfloat16)
    r = None if kind == "none" else jnp.zeros(shape, jnp.float32)
    for call in (bi_jax.rms_norm, JIT):
        out, new_res = pair(call(x, w, 1e-6, r), r is not None)
        assert out.shape == shape and out.dtype == jnp.bfloat16
        if r is not None:
            assert new_res.shape == shape and new_res.dtype == jnp.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_n_equals_one(dtype):
    rng = np.random.default_rng(_seed("n1", dtype))
    x = random_rows(rng, (7, 1), dtype)
    x[0, 0], x[1, 0] = 0.0, -0.0
    w = random_weight(rng, 1, dtype)
    r = random_rows(rng, (7, 1), "float32")
    for mode in ("llama", "fp32"):
        got = pair(JIT(jnp.asarray(x), jnp.asarray(w), 1e-6, jnp.asarray(r), mode=mode), True)
        assert_pair_bits(ref(x, w, 1e-6, r, mode), got, f"n=1 {mode}")
    assert_bits(ref(x, w, 1e-6)[0], JIT(jnp.asarray(x), jnp.asarray(w), 1e-6), "n=1 no residual")


# --------------------------------------------------------------------------------------------
# I) Arguments outside the contract are rejected at trace time, naming the argument.
# --------------------------------------------------------------------------------------------


def _bad_calls():
    f32, bf16 = jnp.float32, jnp.bfloat16
    x = jnp.ones((2, 8), f32)
    w = jnp.ones((8,), f32)
    xb, wb = x.astype(bf16), w.astype(bf16)
    calls = [
        ("weight-shape", dict(x=x, weight=jnp.ones((9,), f32)), ValueError, "weight"),
        ("weight-2d", dict(x=x, weight=jnp.ones((1, 8), f32)), ValueError, "weight"),
        ("residual-shape", dict(x=x, weight=w, residual=jnp.ones((3, 8), f32)), ValueError, "residual"),
        ("weight-dtype", dict(x=x, weight=wb), TypeError, "weight"),
        ("residual-float16-with-bfloat16", dict(x=xb, weight=wb, residual=jnp.ones((2, 8), jnp.float16)),
         TypeError, "residual"),
        ("x-int32", dict(x=jnp.ones((2, 8), jnp.int32), weight=jnp.ones((8,), jnp.int32)), TypeError, "x"),
        ("x-n0", dict(x=jnp.ones((2, 0), f32), weight=jnp.ones((0,), f32)), ValueError, "x"),
        ("x-0d", dict(x=jnp.ones((), f32), weight=jnp.ones((1,), f32)), ValueError, "x"),
        ("mode", dict(x=x, weight=w, mode="bogus"), ValueError, "mode"),
        ("weight_offset-nan", dict(x=x, weight=w, weight_offset=float("nan")), ValueError, "weight_offset"),
        ("weight_offset-inf", dict(x=x, weight=w, weight_offset=1e39), ValueError, "weight_offset"),
        ("weight_offset-str", dict(x=x, weight=w, weight_offset="1"), TypeError, "weight_offset"),
        ("eps-array", dict(x=x, weight=w, eps=jnp.float32(1e-6)), TypeError, "eps"),
        ("x-list", dict(x=[[1.0] * 8, [2.0] * 8], weight=w), TypeError, "x"),
        ("weight-list", dict(x=x, weight=[1.0] * 8), TypeError, "weight"),
    ]
    for eps in (0.0, -1.0, float("nan"), float("inf"), 1e-50):
        calls.append((f"eps-{eps}", dict(x=x, weight=w, eps=eps), ValueError, "eps"))
    return calls


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("kwargs,error,name", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_are_rejected(kwargs, error, name):
    with pytest.raises(error, match=rf"^{name}:"):
        bi_jax.rms_norm(**kwargs)


@pytest.mark.parametrize("kwargs,error,name", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_are_rejected_while_tracing_under_jit(kwargs, error, name):
    arrays = {k: v for k, v in kwargs.items() if k in ("x", "weight", "residual")}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    f = jax.jit(lambda a: bi_jax.rms_norm(**a, **static))
    with pytest.raises(error, match=rf"^{name}:"):
        f(arrays)


# --------------------------------------------------------------------------------------------
# J) The flax.nnx module.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nnx():
    return pytest.importorskip("flax.nnx", reason="flax is not installed")


def _load(module, array: np.ndarray) -> None:
    """Load a checkpoint array into the module's weight (set_value on flax >= 0.12, .value before)."""
    if hasattr(module.weight, "set_value"):
        module.weight.set_value(array)
    else:
        module.weight.value = array


def test_import_bi_jax_does_not_import_flax():
    # `import bi_jax` leaves flax alone; without flax, RMSNorm's ImportError names it.
    code = ("import sys; import bi_jax; assert 'flax' not in sys.modules, 'import bi_jax imported flax'\n"
            "sys.modules['flax'] = None; assert 'RMSNorm' in dir(bi_jax)\n"
            "try:\n    bi_jax.RMSNorm\nexcept ImportError as e:\n    print('ImportError', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ImportError" in done.stdout and "flax" in done.stdout


def test_flax_module_parameters(nnx):
    norm = bi_jax.RMSNorm(64)
    assert (norm.hidden_size, norm.eps, norm.mode, norm.weight_offset) == (64, 1e-6, "llama", 0.0)
    assert isinstance(norm.weight, nnx.Param)
    assert norm.weight[...].shape == (64,) and norm.weight[...].dtype == jnp.float32
    assert_bits(np.ones(64, np.float32), norm.weight[...])
    gemma = bi_jax.RMSNorm(64, 1e-5, mode="fp32", weight_offset=1.0, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert (gemma.eps, gemma.mode, gemma.weight_offset) == (1e-5, "fp32", 1.0)
    assert_bits(np.zeros(64, ml_dtypes.bfloat16), gemma.weight[...])
    assert set(nnx.state(gemma, nnx.Param).keys()) == {"weight"}  # HF-style parameter name


FLAX_COMBOS = [("bfloat16", "llama", 0.0, "none"), ("bfloat16", "fp32", 1.0, "float32"),
               ("float16", "llama", 1.0, "same"), ("float32", "fp32", 0.0, "float32")]


@pytest.mark.parametrize("dtype,mode,offset,kind", FLAX_COMBOS)
def test_flax_module_matches_the_function(nnx, dtype, mode, offset, kind):
    rng = np.random.default_rng(_seed("flax", dtype, mode, offset, kind))
    eps = 1e-5
    norm = bi_jax.RMSNorm(N, eps, mode=mode, weight_offset=offset, dtype=JNP_DTYPES[dtype])
    w = random_weight(rng, N, dtype)
    _load(norm, w)
    x = random_rows(rng, (2, 3, N), dtype)
    r = None if kind == "none" else random_rows(rng, (2, 3, N), residual_dtype(dtype, kind))
    jr = None if r is None else jnp.asarray(r)
    got = pair(norm(jnp.asarray(x), jr), r is not None)
    fn = pair(JIT(jnp.asarray(x), jnp.asarray(norm.weight[...]), eps, jr, mode=mode, weight_offset=offset),
              r is not None)
    assert_pair_bits(fn, got, "module vs bi_jax.rms_norm")
    assert_pair_bits(ref(x, w, eps, r, mode, offset), got, "module vs reference")


def test_flax_module_loads_a_checkpoint(nnx):
    rng = np.random.default_rng(_seed("checkpoint"))
    n, eps = N, 1e-6
    # An HF-style state dict as torch would hand it to numpy: bfloat16 through an int16 view.
    bits = random_weight(rng, n, "bfloat16").view(np.int16).copy()
    state_dict = {"model.layers.0.input_layernorm.weight": bits.view(ml_dtypes.bfloat16)}
    norm = bi_jax.RMSNorm(n, eps, dtype=jnp.bfloat16)
    _load(norm, state_dict["model.layers.0.input_layernorm.weight"])
    assert_bits(state_dict["model.layers.0.input_layernorm.weight"], norm.weight[...])
    x = random_rows(rng, (5, n), "bfloat16")
    r = random_rows(rng, (5, n), "bfloat16")
    out, new_res = norm(jnp.asarray(x), jnp.asarray(r))
    e_out, e_res = ref(x, state_dict["model.layers.0.input_layernorm.weight"], eps, r)
    assert_bits(e_out, out, "checkpoint out")
    assert_bits(e_res, new_res, "checkpoint new_residual")

    @nnx.jit
    def forward(module, a, b):
        return module(a, b)

    result = forward(norm, jnp.asarray(x), jnp.asarray(r))
    assert isinstance(result, tuple) and len(result) == 2
    assert_bits(e_out, result[0], "nnx.jit out")
    assert_bits(e_res, result[1], "nnx.jit new_residual")
    assert_bits(ref(x, state_dict["model.layers.0.input_layernorm.weight"], eps)[0],
                nnx.jit(lambda m, a: m(a))(norm, jnp.asarray(x)), "nnx.jit without residual")


def test_flax_module_rejects_a_checkpoint_of_another_dtype(nnx):
    norm = bi_jax.RMSNorm(N, dtype=jnp.bfloat16)
    _load(norm, np.ones(N, np.float32))  # no silent cast: the call names the weight
    with pytest.raises(TypeError, match="^weight:"):
        norm(jnp.ones((2, N), jnp.bfloat16))


# --------------------------------------------------------------------------------------------
# K) A property: any n, rows, dtype, mode, offset and residual kind equals the reference.
# --------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    n=st.integers(1, 300),
    rows=st.integers(0, 9),
    kind=st.sampled_from(["none", "same", "float32"]),
    mode=st.sampled_from(["llama", "fp32"]),
    weight_offset=st.sampled_from([0.0, 1.0, -0.5]),
    eps=st.sampled_from([1e-6, 1e-5, 0.25, 1e-30]),
    specials=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_matches_reference(dtype, n, rows, kind, mode, weight_offset, eps, specials, seed):
    rng = np.random.default_rng(seed)
    make = special_rows if specials else random_rows
    x = make(rng, (rows, n), dtype)
    w = random_weight(rng, n, dtype)
    r = None if kind == "none" else make(rng, (rows, n), residual_dtype(dtype, kind))
    got = pair(bi_jax.rms_norm(jnp.asarray(x), jnp.asarray(w), eps, None if r is None else jnp.asarray(r),
                               mode=mode, weight_offset=weight_offset), r is not None)
    assert got[0].shape == x.shape
    assert_pair_bits(ref(x, w, eps, r, mode, weight_offset), got, "property vs reference")


# --------------------------------------------------------------------------------------------
# L) Performance contract of the eager path.
# --------------------------------------------------------------------------------------------


def test_eager_call_reuses_its_compiled_kernel(caplog):
    """A second eager call with the same shapes and arguments must not compile again."""
    x, w = jnp.ones((4, N), jnp.float32), jnp.ones((N,), jnp.float32)
    jax.block_until_ready(bi_jax.rms_norm(x, w, 1e-6))  # warm: every compile happens here
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        jax.block_until_ready(bi_jax.rms_norm(x, w, 1e-6))
    compiles = [r.getMessage().split(" with ")[0] for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiles == [], f"the second eager call compiled again: {compiles}"
